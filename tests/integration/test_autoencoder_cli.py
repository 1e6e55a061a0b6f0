"""The 3D autoencoder through the CLI: fit, resume with the GAN state, reconstruct to NIfTI like the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.provenance import provenance

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["--config", str(ROOT / "configs/ae3d.yaml"), "--config", str(ROOT / "configs/tests/tiny_ae3d.yaml")]


def write_volumes(folder: Path, shapes: dict[str, tuple[int, int, int]]) -> dict[str, np.ndarray]:
    """Smooth blobs with an oblique, non-unit affine, as MRI-like float volumes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affines = {}
    for i, (name, shape) in enumerate(shapes.items()):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        centre = rng.uniform(-0.3, 0.3, (3, 1, 1, 1))
        vol = 800 * np.exp(-((grid - centre) ** 2).sum(0) * 3) + rng.normal(0, 10, shape) + 100
        affine = np.array([[0, -1.2, 0, 30.0 + i], [1.1, 0, 0, -20.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), folder / f"{name}.nii.gz")
        affines[name] = affine
    return affines


@pytest.fixture
def volumes(tmp_path):
    affines = write_volumes(tmp_path / "vols", {"a": (20, 24, 16), "b": (18, 16, 22), "c": (16, 20, 17)})
    manifest = tmp_path / "vols" / "manifest.json"
    manifest.write_text(json.dumps([{"image": "a.nii.gz", "split": "train"}, {"image": "b.nii.gz", "split": "train"},
                                    {"image": "c.nii.gz", "split": "val"}]))
    return manifest, affines


def optimiser_steps(state: dict) -> int:
    return int(next(iter(state["state"].values()))["step"])


def test_fit_resume_and_reconstruct_keep_shape_affine_and_gan_state(tmp_path, volumes, capsys):
    manifest, affines = volumes
    run = tmp_path / "run"
    main(["fit", *CONFIGS, "--data.manifest", str(manifest), "--trainer.default_root_dir", str(run)])
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 3  # generator steps; the discriminator stepped at steps 1 and 2 as well
    assert len(ckpt["optimizer_states"]) == 2 and optimiser_steps(ckpt["optimizer_states"][1]) == 2
    assert list((run / "reconstructions").glob("*.png"))

    # resume: the step count and the discriminator's optimiser continue where they stopped
    main(["fit", *CONFIGS, "--data.manifest", str(manifest), "--trainer.default_root_dir", str(run),
          "--trainer.max_steps", "5", "--ckpt_path", str(last)])
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 5
    assert optimiser_steps(ckpt["optimizer_states"][1]) == 4
    assert optimiser_steps(ckpt["optimizer_states"][0]) == 5

    out = tmp_path / "recon"
    main(["predict", *CONFIGS, "--ckpt_path", str(last), "--data.manifest", str(manifest), "--output_dir", str(out)])
    for name, affine in affines.items():
        src = nib.load(manifest.parent / f"{name}.nii.gz")
        rec = nib.load(out / f"{name}.nii.gz")
        assert rec.shape == src.shape
        np.testing.assert_allclose(rec.affine, affine, atol=1e-5)
        data = rec.get_fdata()
        assert np.isfinite(data).all()
        # written back in the input's intensity units, not [-1, 1]
        assert data.max() > 50 and data.min() > -500
        assert provenance(out / f"{name}.nii.gz")["synthetic"] is True
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["synthetic"] is True and meta["num_reconstructions"] == 3 and meta["checkpoint_sha256"]

    # an existing result is never overwritten silently
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["predict", *CONFIGS, "--ckpt_path", str(last), "--data.manifest", str(manifest), "--output_dir", str(out)])
    assert e.value.code == 2
    assert "not empty" in capsys.readouterr().err


def test_stage2_without_stage1_checkpoint_is_one_line(tmp_path, volumes, capsys):
    manifest, _ = volumes
    with pytest.raises(SystemExit) as e:
        main(["fit", *CONFIGS, "--config", str(ROOT / "configs/ae3d_stage2.yaml"), "--data.manifest", str(manifest),
              "--data.patch_size", "16", "--model.encode_patch_size", "8",
              "--trainer.default_root_dir", str(tmp_path / "run2")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage-1 checkpoint" in err[0]
    assert not (tmp_path / "run2").exists() or not list((tmp_path / "run2").rglob("*.ckpt"))


def test_stage2_trains_the_decoder_on_larger_crops_from_stage1(tmp_path, volumes):
    manifest, _ = volumes
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    main(["fit", *CONFIGS, "--data.manifest", str(manifest), "--trainer.default_root_dir", str(run1),
          "--trainer.max_steps", "2"])
    main(["fit", *CONFIGS, "--config", str(ROOT / "configs/ae3d_stage2.yaml"), "--data.manifest", str(manifest),
          "--data.patch_size", "16", "--model.encode_patch_size", "8", "--data.batch_size", "1",
          "--model.init_from", str(run1 / "checkpoints/last.ckpt"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(run2)])
    s1 = torch.load(run1 / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    s2 = torch.load(run2 / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    codebook = [k for k in s1 if k.startswith("net.quantizer.")]
    assert codebook and all(torch.equal(s1[k], s2[k]) for k in codebook)
    encoder = [k for k in s1 if k.startswith("net.encoder")]
    assert encoder and all(torch.equal(s1[k], s2[k]) for k in encoder)


def test_vae2d_takes_the_seg2d_data_flags_and_reconstructs_test_images(tmp_path, seg_dataset):
    img_dir, seg_dir = seg_dataset
    run, out = tmp_path / "vae", tmp_path / "vae_out"
    tiny = ["--config", str(ROOT / "configs/vae2d.yaml"), "--model.net.init_args.channels", "[8, 16]",
            "--model.net.init_args.num_res_blocks", "1", "--model.net.init_args.norm_num_groups", "4",
            "--model.discriminator.init_args.channels", "8", "--model.discriminator.init_args.num_layers_d", "1",
            "--model.adversarial_start_step", "2", "--trainer.enable_progress_bar", "false",
            "--data.img_dir", str(img_dir), "--data.seg_dir", str(seg_dir), "--data.image_size", "32",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.logger", "false"]
    main(["fit", *tiny, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(run)])
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    main(["predict", *tiny, "--ckpt_path", str(ckpt), "--data.predict_images", "true", "--output_dir", str(out)])
    names = sorted(p.stem for p in (img_dir / "test").glob("*.png"))
    assert sorted(p.stem for p in out.glob("*.npy")) == names
    rec = np.load(out / f"{names[0]}.npy")
    assert rec.shape == (1, 32, 32) and np.abs(rec).max() <= 1
    assert provenance(out / f"{names[0]}.png")["synthetic"] is True

    # scoring reconstruction quality on the test split: PSNR, SSIM and MS-SSIM, kept beside the checkpoints
    main(["test", *tiny, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(run)])
    scores = json.loads((run / "scores" / "real_test.json").read_text())["scores"]
    assert {"test/psnr", "test/ssim", "test/ms_ssim"} <= set(scores) and 0 < scores["test/ms_ssim"] <= 1
    # the same PSNR as the written reconstructions against their inputs
    from medsynth.data.image2d import read_image, resize_image, to_unit_range
    from medsynth.metrics import psnr

    real = torch.stack([resize_image(torch.from_numpy(to_unit_range(read_image(img_dir / "test" / f"{n}.png", 1))), 32)
                        for n in names])
    recs = torch.stack([torch.from_numpy(np.load(out / f"{n}.npy")) for n in names])
    assert psnr(recs, real).mean().item() == pytest.approx(scores["test/psnr"], abs=0.05)
