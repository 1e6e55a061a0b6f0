"""The 3D latent chain through the CLI: autoencoder → encode → BiFlowNet → generated NIfTI volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.data.latents import LatentDataModule, LatentDataset
from medsynth.provenance import provenance
from tests.integration.test_autoencoder_cli import write_volumes

ROOT = Path(__file__).resolve().parents[2]
AE = ["--config", str(ROOT / "configs/ae3d.yaml"), "--config", str(ROOT / "configs/tests/tiny_ae3d.yaml")]
ENCODE = ["--config", str(ROOT / "configs/encode3d.yaml")]
LDM = ["--config", str(ROOT / "configs/biflownet3d.yaml"), "--config", str(ROOT / "configs/tests/tiny_biflownet3d.yaml")]
TINY_VAE2D = ["--config", str(ROOT / "configs/vae2d.yaml"), "--model.net.init_args.channels", "[8, 16]",
              "--model.net.init_args.num_res_blocks", "1", "--model.net.init_args.norm_num_groups", "4",
              "--model.discriminator", "null", "--data.image_size", "16", "--data.batch_size", "4",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
"""A seconds-long 2D KL-VAE (2x down, no discriminator) at 16 pixels; add the data flags."""
TINY_LDM2D = ["--config", str(ROOT / "configs/ldm2d.yaml"), "--model.net.init_args.block_out_channels", "[8, 16]",
              "--model.net.init_args.attention_levels", "[false, false]", "--model.net.init_args.layers_per_block", "1",
              "--model.net.init_args.norm_num_groups", "4", "--model.sampler.init_args.num_inference_steps", "2",
              "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.val_check_interval", "1.0"]
"""A seconds-long 2D latent UNet with 2 sampling steps, validated every epoch of the tiny data (the recipe validates
by steps); add the latent manifest and the conditioning flags."""


@pytest.fixture
def encoded(tmp_path):
    """A tiny autoencoder trained on 3 labelled volumes, and their latents."""
    affines = write_volumes(tmp_path / "vols", {"a": (20, 24, 16), "b": (18, 16, 22), "c": (16, 20, 17)})
    manifest = tmp_path / "vols" / "manifest.json"
    manifest.write_text(json.dumps([{"image": "a.nii.gz", "split": "train", "label": 0},
                                    {"image": "b.nii.gz", "split": "train", "label": 1},
                                    {"image": "c.nii.gz", "split": "val", "label": 1}]))
    main(["fit", *AE, "--data.manifest", str(manifest), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(tmp_path / "ae")])
    ae_ckpt = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    latents = tmp_path / "latents"
    main(["predict", *ENCODE, "--ckpt_path", str(ae_ckpt), "--data.manifest", str(manifest),
          "--output_dir", str(latents)])
    return {"manifest": manifest, "affines": affines, "ae": ae_ckpt, "latents": latents}


def test_encoding_writes_latents_and_a_manifest_whose_scaling_round_trips(encoded):
    info = json.loads((encoded["latents"] / "latents.json").read_text())
    assert info["autoencoder"]["latent_channels"] == 4 and info["autoencoder"]["downsample_factor"] == 2
    assert info["class_names"] == ["0", "1"]
    recs = {r["name"]: r for r in info["records"]}
    assert set(recs) == {"a", "b", "c"} and recs["b"]["label"] == 1 and recs["c"]["split"] == "val"
    np.testing.assert_allclose(recs["a"]["affine"], encoded["affines"]["a"])
    assert recs["a"]["shape"] == [4, 12, 12, 8]  # 20x24x16 padded to the 8-voxel patch, halved
    # min-max scaling maps the dataset's latents onto [-1, 1]; undoing it gives the raw latents back exactly
    dm = LatentDataModule(manifest=encoded["latents"] / "latents.json", num_workers=0, crop_size=8)
    s = info["scaling"]
    whole = LatentDataset(dm.info["records"], s["shift"], s["scale"])  # uncropped, unflipped
    scaled = {whole[i]["name"]: whole[i]["image"] for i in range(len(whole))}
    assert min(float(z.min()) for z in scaled.values()) == pytest.approx(-1, abs=1e-5)
    assert max(float(z.max()) for z in scaled.values()) == pytest.approx(1, abs=1e-5)
    raw = np.load(encoded["latents"] / "latents" / "c.npy")
    np.testing.assert_allclose(scaled["c"].numpy() / s["scale"] + s["shift"], raw, rtol=1e-5, atol=1e-5)
    assert dm.model_args()["sample_shape"] == [8, 8, 8] and dm.model_args()["image_channels"] == 4
    # and the raw latents decode to what the autoencoder reconstructs
    from medsynth.loading import load_module

    ae = load_module(encoded["ae"])
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    z = ae.encode(x)
    z_scaled = (z - s["shift"]) * s["scale"]
    torch.testing.assert_close(ae.net.decode(z_scaled / s["scale"] + s["shift"]), ae.net.decode(z), rtol=1e-4, atol=1e-4)


def test_fit_on_latents_then_generate_nifti_volumes_per_class(encoded, tmp_path):
    run = tmp_path / "ldm"
    main(["fit", *LDM, "--data.manifest", str(encoded["latents"] / "latents.json"), "--trainer.default_root_dir", str(run),
          "--data.crop_size", "[4, 8]", "--trainer.callbacks+=medsynth.callbacks.SampleGridLogger", "--trainer.callbacks.every_n_epochs", "1",
          "--trainer.callbacks.num_samples", "2"])
    # the dashboard picture: a sampled and the real (one val volume) latent crop 8^3, decoded to 16^3: 3 mid-slices
    previews = sorted((run / "samples").glob("*.png"))
    assert previews and provenance(previews[-1])["synthetic"] is True
    from PIL import Image

    assert Image.open(previews[-1]).size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"net"}  # the autoencoder is not part of the trained weights
    out = tmp_path / "generated"
    main(["predict", *LDM, "--ckpt_path", str(ckpt), "--data.output_shape", "[16, 24, 16]",
          "--data.spacing", "[1.2, 1.1, 1.5]", "--output_dir", str(out)])
    for cls in ("0", "1"):
        files = sorted((out / cls).glob("*.nii.gz"))
        assert len(files) == 2
        img = nib.load(files[0])
        assert img.shape == (16, 24, 16)
        np.testing.assert_allclose(img.header.get_zooms(), (1.2, 1.1, 1.5), rtol=1e-5)
        # the sources' axis directions (permuted, one flipped) at the chosen spacing; their origins differ: 0
        np.testing.assert_allclose(img.affine, [[0, -1.1, 0, 0], [1.2, 0, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 1]],
                                   atol=1e-5)
        # written in the sources' units: MRI-like volumes, so [-1, 1] maps to the median of their percentile ranges
        units = json.loads((encoded["latents"] / "latents.json").read_text())["intensity"]
        data = img.get_fdata()
        assert np.isfinite(data).all() and units["low"] - 1e-3 <= data.min() and data.max() <= units["high"] + 1e-3
        assert provenance(files[0])["synthetic"] is True
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["synthetic"] is True and meta["num_samples"] == 4 and meta["class_names"] == ["0", "1"]


def test_generation_refuses_sizes_the_net_cannot_make_and_foreign_autoencoders(encoded, tmp_path, capsys):
    run = tmp_path / "ldm"
    main(["fit", *LDM, "--data.manifest", str(encoded["latents"] / "latents.json"), "--trainer.max_steps", "1",
          "--trainer.default_root_dir", str(run)])
    ckpt = str(run / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:  # 18 voxels -> 9 latent voxels: not a multiple of the DiT sub-volume (4)
        main(["predict", *LDM, "--ckpt_path", ckpt, "--data.output_shape", "[18, 16, 16]", "--output_dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medsynth: error:")
    assert not out.exists() or not any(out.iterdir())
    # another autoencoder file than the one that encoded the latents
    other = tmp_path / "other.ckpt"
    ck = torch.load(encoded["ae"], weights_only=False)
    ck["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    torch.save(ck, other)
    with pytest.raises(SystemExit) as e:
        main(["predict", *LDM, "--ckpt_path", ckpt, "--model.autoencoder", str(other), "--output_dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(other) in err[0] and "not the autoencoder" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_2d_chain_vae_encode_ldm_sample_follows_the_masks_layout(tmp_path, seg_dataset):
    img_dir, seg_dir = seg_dataset
    vae = [*TINY_VAE2D, "--data.num_workers", "0"]
    main(["fit", *vae, "--data.img_dir", str(img_dir), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(tmp_path / "vae")])
    latents = tmp_path / "latents"
    main(["predict", "--config", str(ROOT / "configs/encode2d.yaml"), "--ckpt_path",
          str(tmp_path / "vae/checkpoints/last.ckpt"), "--data.img_dir", str(img_dir), "--data.seg_dir", str(seg_dir),
          "--data.num_classes", "3", "--data.num_workers", "0", "--output_dir", str(latents)])
    info = json.loads((latents / "latents.json").read_text())
    assert len(info["records"]) == 16 and {r["split"] for r in info["records"]} == {"train", "val", "test"}
    assert all((latents / r["mask"]).is_file() for r in info["records"]) and info["scaling"]["method"] == "std"

    ldm = [*TINY_LDM2D, "--data.num_classes", "3"]
    main(["fit", *ldm, "--data.manifest", str(latents / "latents.json"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(tmp_path / "ldm"), "--trainer.callbacks+=medsynth.callbacks.SampleGridLogger",
          "--trainer.callbacks.every_n_epochs", "1", "--trainer.callbacks.num_samples", "2"])
    from PIL import Image

    # preview: masks, decoded samples and decoded real latents, 2 each at the 16-pixel image size
    assert [Image.open(p).size for p in (tmp_path / "ldm" / "samples").glob("*.png")] == [(2 * 18 + 2, 3 * 18 + 2)]
    out = tmp_path / "samples"
    main(["predict", *ldm, "--ckpt_path", str(tmp_path / "ldm/checkpoints/last.ckpt"), "--output_dir", str(out)])
    names = sorted(p.stem for p in (img_dir / "test").glob("*.png"))
    assert sorted(p.stem for p in (out / "samples").glob("*.npy")) == names
    assert np.load(out / "samples" / f"{names[0]}.npy").shape == (1, 16, 16)  # decoded to image size
    from PIL import Image

    written = np.array(Image.open(out / "masks" / f"{names[0]}.png"))
    original = np.array(Image.open(seg_dir / "all" / "test" / f"{names[0]}.png").resize((16, 16), Image.NEAREST))
    assert written.shape == (16, 16) and (written == original).mean() > 0.9  # the conditioning mask, full size

    # the folder scores like a pixel-space one: decoded 1-channel images, not the 4-channel latents
    from tests.integration.test_cli import run
    from tests.integration.test_segmenter import seg_args

    seg = seg_args(img_dir, seg_dir)
    assert run("fit", *seg, "--trainer.max_steps", 1, "--trainer.default_root_dir", tmp_path / "seg") == 0
    assert run("test", *seg, "--ckpt_path", tmp_path / "seg/checkpoints/last.ckpt", "--data",
               "medsynth.data.SampleDirDataModule", "--data.samples_dir", out) == 0
    scored = json.loads((out / "scores.json").read_text())
    assert scored["num_samples"] == 4 and "test/dice" in scored["scores"]


def test_2d_class_chain_vae_encode_ldm_samples_a_folder_per_class(tmp_path):
    """Class-conditional 2D latent diffusion: class-labelled images encoded with their labels, a class-guided
    UNet on the latents, decoded samples written per class."""
    from tests.integration.test_classifier import CLASSES, make_shapes

    class_map = make_shapes(tmp_path / "shapes")
    data = ["--data", "medsynth.data.ClassImageDataModule", "--data.manifest", str(class_map), "--data.num_workers", "0"]
    vae = [*TINY_VAE2D, *data]
    main(["fit", *vae, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "vae")])
    latents = tmp_path / "latents"
    main(["predict", "--config", str(ROOT / "configs/encode2d.yaml"), "--ckpt_path",
          str(tmp_path / "vae/checkpoints/last.ckpt"), *data, "--data.predict_images", "true",
          "--output_dir", str(latents)])
    info = json.loads((latents / "latents.json").read_text())
    assert info["class_names"] == list(CLASSES) and len(info["records"]) == 2 * (8 + 4 + 4)
    recs = {r["name"]: r for r in info["records"]}
    assert recs["square_val_square_002"]["label"] == 1 and recs["disc_train_disc_000"]["split"] == "train"
    assert {r["split"] for r in info["records"]} == {"train", "val", "test"}
    ae, side = info["autoencoder"], 16 // info["autoencoder"]["downsample_factor"]
    assert np.load(latents / recs["disc_test_disc_000"]["latent"]).shape == (ae["latent_channels"], side, side)

    ldm = [*TINY_LDM2D, "--data.num_classes", "0", "--data.num_samples", "3"]
    main(["fit", *ldm, "--data.manifest", str(latents / "latents.json"), "--model.label_drop_prob", "0.1",
          "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "ldm")])
    ckpt = torch.load(tmp_path / "ldm/checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"] == list(CLASSES)
    out = tmp_path / "samples"
    main(["predict", *ldm, "--ckpt_path", str(tmp_path / "ldm/checkpoints/last.ckpt"), "--model.guidance_scale", "2",
          "--output_dir", str(out)])
    for name in CLASSES:
        files = sorted((out / name).glob("*.npy"))
        assert len(files) == 3 and np.load(files[0]).shape == (1, 16, 16)  # decoded to image size
        assert provenance(files[0])["synthetic"] is True
    assert json.loads((out / "metadata.json").read_text())["class_names"] == list(CLASSES)

    # scored for class faithfulness like a pixel-space folder (the samples are decoded 1-channel images)
    from tests.integration.test_classifier import cls_args
    from tests.integration.test_cli import run

    judge = cls_args(class_map)
    assert run("fit", *judge, "--trainer.max_steps", 1, "--trainer.default_root_dir", tmp_path / "cls") == 0
    assert run("test", *judge, "--ckpt_path", tmp_path / "cls/checkpoints/last.ckpt", "--data",
               "medsynth.data.SampleDirDataModule", "--data.samples_dir", out) == 0
    scored = json.loads((out / "scores.json").read_text())
    assert scored["num_samples"] == 6 and "test/accuracy" in scored["scores"]
