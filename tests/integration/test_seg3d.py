"""3D mask-guided latent diffusion end to end on tiny generated volumes: volumes + label maps → tiny autoencoder
→ encode (label maps written beside the latents) → tiny mask-guided BiFlowNet → samples on label maps, each
written in its label map's geometry; and the one-line refusals of bad label maps, also through the console
script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medsynth.cli import main
from medsynth.data.volumes import VolumeDataModule, read_label_map
from medsynth.diffusion import DDIMSampler
from medsynth.errors import DataError
from medsynth.modules import DiffusionModule
from medsynth.nets import BiFlowNet3D
from medsynth.provenance import provenance
from tests.integration.test_cli import run

ROOT = Path(__file__).resolve().parents[2]
C = lambda name: str(ROOT / "configs" / name)  # noqa: E731
MEDSYNTH = Path(sys.executable).with_name("medsynth")
SIDE = 16
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-10.0, 4.0, 7.0]


def label_map(seed: int) -> np.ndarray:
    """Background, a box (1) and a ball (2) at places drawn from ``seed``: ``(SIDE,)*3`` uint8."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((SIDE,) * 3, np.uint8)
    a = rng.integers(1, 6, 3)
    labels[a[0] : a[0] + 7, a[1] : a[1] + 6, a[2] : a[2] + 8] = 1
    c = rng.integers(6, 11, 3)
    grid = np.indices(labels.shape)
    labels[((grid - c[:, None, None, None]) ** 2).sum(0) < 9] = 2
    return labels


def write_volumes(root: Path, n: int = 4) -> Path:
    """``n`` volumes whose intensities follow their label maps, the label maps, and a manifest pairing them."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    records = []
    for i in range(n):
        labels = label_map(i)
        image = np.array([0.0, 400.0, 900.0], np.float32)[labels]
        image += np.random.default_rng(100 + i).normal(0, 20, labels.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, AFFINE), root / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, AFFINE), root / "labels" / f"case{i}.nii.gz")
        records.append({"image": f"images/case{i}.nii.gz", "mask": f"labels/case{i}.nii.gz",
                        "split": "val" if i == n - 1 else "train"})
    (root / "volumes.json").write_text(json.dumps(records))
    return root / "volumes.json"


def test_a_label_map_on_a_finer_grid_is_resampled_onto_its_image_and_one_off_the_image_is_refused(tmp_path):
    labels = label_map(0)
    fine = np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2)  # 1 mm voxels over the same field of view
    fine_affine = AFFINE.copy()
    fine_affine[:3, :3] = np.eye(3)
    fine_affine[:3, 3] -= 0.5  # voxel centres of the fine grid sit half a coarse voxel apart
    nib.save(nib.Nifti1Image(fine, fine_affine), tmp_path / "fine.nii.gz")
    got, affine = read_label_map(tmp_path / "fine.nii.gz", 3, ((SIDE,) * 3, AFFINE))
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(affine, AFFINE)

    shifted = AFFINE.copy()
    shifted[:3, 3] += 100.0  # the same grid 10 cm away: no overlap with the image
    nib.save(nib.Nifti1Image(labels, shifted), tmp_path / "elsewhere.nii.gz")
    with pytest.raises(DataError, match=r"elsewhere.nii.gz: label map of grid 16x16x16 does not cover"):
        read_label_map(tmp_path / "elsewhere.nii.gz", 3, ((SIDE,) * 3, AFFINE))
    with pytest.raises(DataError, match=r"fine.nii.gz: label map holds label 2 >= data.num_classes=2"):
        read_label_map(tmp_path / "fine.nii.gz", 2, ((SIDE,) * 3, AFFINE))


def test_pixel_space_volume_patches_carry_their_label_maps(tmp_path):
    manifest = write_volumes(tmp_path)
    data = VolumeDataModule(manifest, patch_size=8, batch_size=2, num_workers=0, samples_per_volume=2,
                            queue_length=4, val_patches_per_volume=2)
    assert data.model_args()["num_classes"] == 3  # counted from the label maps
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["mask"].shape == (2, 8, 8, 8) and batch["mask"].dtype == torch.int64
    # the intensities follow the labels in every patch (flipped and turned together)
    means = [batch["image"][batch["mask"][:, None] == k].mean() for k in range(3) if (batch["mask"] == k).any()]
    assert all(a < b for a, b in zip(means, means[1:]))
    val = data.datasets["val"][0]
    assert val["mask"].shape == (8, 8, 8)

    # the pixel-space model: one-hot label maps concatenated to a 3D net's input, ablation, guidance
    net = partial(BiFlowNet3D, channels=[8, 16], norm_num_groups=4, dit_patch=4, dit_token_patch=2, dit_hidden=16,
                  dit_depth=1, dit_heads=2)
    args = data.model_args()
    model = DiffusionModule(net=net, sampler=DDIMSampler(num_inference_steps=2), num_classes=args["num_classes"],
                            image_channels=args["image_channels"], image_size=args["image_size"],
                            mask_ablation_prob=0.5, label_drop_prob=0.2)
    assert model.net.in_channels == 1 + 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):  # BiFlowNet's output layer starts at zero: a step makes its output depend on the input
        loss = model.diffusion_loss(batch, torch.Generator().manual_seed(step))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    masks = torch.stack([batch["mask"][0], torch.zeros_like(batch["mask"][0])])
    samples = model.sample(masks, indices=[0, 0], guidance_scale=2.0)  # one seed, two label maps
    assert samples.shape == (2, 1, 8, 8, 8) and not torch.allclose(samples[0], samples[1])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Volumes + label maps → tiny autoencoder → encoded latents with label maps → tiny mask-guided BiFlowNet."""
    root = tmp_path_factory.mktemp("seg3d")
    manifest = write_volumes(root / "data")
    main(["fit", "--config", C("ae3d.yaml"), "--config", C("tests/tiny_ae3d.yaml"), "--data.manifest",
          str(manifest), "--trainer.default_root_dir", str(root / "ae")])
    latents = root / "latents"
    main(["predict", "--config", C("encode3d.yaml"), "--ckpt_path", str(root / "ae/checkpoints/last.ckpt"),
          "--data.manifest", str(manifest), "--data.num_workers", "0", "--output_dir", str(latents)])
    ldm = ["--config", C("biflownet3d_seg.yaml"), "--config", C("tests/tiny_biflownet3d.yaml")]
    main(["fit", *ldm, "--data.manifest", str(latents / "latents.json"), "--trainer.max_steps", "4",
          "--trainer.default_root_dir", str(root / "ldm")])
    return {"root": root, "data": root / "data", "latents": latents, "ldm": ldm,
            "ckpt": root / "ldm/checkpoints/last.ckpt"}


def test_encoding_writes_each_label_map_beside_its_latent(chain):
    info = json.loads((chain["latents"] / "latents.json").read_text())
    assert info["num_classes"] == 3
    for rec in info["records"]:
        mask = nib.load(chain["latents"] / rec["mask"])
        source = nib.load(chain["data"] / "labels" / f"{rec['name']}.nii.gz")
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(source.dataobj))
        np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-5)
        assert rec["mask"] == f"masks/{rec['name']}.nii.gz" and rec["mask_source"].endswith(f"{rec['name']}.nii.gz")
    hp = torch.load(chain["ckpt"], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["num_classes"] == 3 and hp["mask_encoding"] == "patch_embedding" and hp["label_drop_prob"] > 0
    ckpt = torch.load(chain["ckpt"], map_location="cpu", weights_only=False)
    assert any(k.startswith("mask_embedding.") for k in ckpt["state_dict"])  # the embedding is saved with the net


def test_predict_on_label_maps_writes_samples_in_their_geometry(chain, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    affine = AFFINE.copy()
    affine[:3, 3] = [1.0, 2.0, 3.0]  # a new subject's own position
    for name, seed in (("new_a", 11), ("new_b", 12)):
        nib.save(nib.Nifti1Image(label_map(seed), affine), maps / f"{name}.nii.gz")
    out = tmp_path / "out"
    main(["predict", *chain["ldm"], "--ckpt_path", str(chain["ckpt"]), "--data.predict_masks", str(maps),
          "--model.guidance_scale", "2.0", "--output_dir", str(out)])
    for name, seed in (("new_a", 11), ("new_b", 12)):
        sample = nib.load(out / "samples" / f"{name}.nii.gz")
        assert sample.shape == (SIDE,) * 3 and np.isfinite(sample.get_fdata()).all()
        np.testing.assert_allclose(sample.affine, affine, atol=1e-5)
        assert provenance(out / "samples" / f"{name}.nii.gz")["synthetic"] is True
        copied = nib.load(out / "masks" / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(copied.dataobj), label_map(seed))
        np.testing.assert_allclose(copied.affine, affine, atol=1e-5)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["guidance_scale"] == 2.0 and meta["num_samples"] == 2
    assert meta["conditioning_masks"] == {n: str(maps / f"{n}.nii.gz") for n in ("new_a", "new_b")}

    # through a manifest, a label map whose sides the latent grid does not divide: padded, and cropped back
    nib.save(nib.Nifti1Image(label_map(13)[:14, :12, :10], affine), maps / "odd.nii.gz")
    manifest = tmp_path / "maps.json"
    manifest.write_text(json.dumps([{"mask": "maps/odd.nii.gz"}]))
    main(["predict", *chain["ldm"], "--ckpt_path", str(chain["ckpt"]), "--data.predict_masks", str(manifest),
          "--data.predict_mask_multiple", "8", "--output_dir", str(tmp_path / "out2")])
    assert sorted(p.name for p in (tmp_path / "out2/samples").glob("*.nii.gz")) == ["odd.nii.gz"]
    odd = nib.load(tmp_path / "out2/samples/odd.nii.gz")
    assert odd.shape == (14, 12, 10) and np.allclose(odd.affine, affine, atol=1e-5)


def test_logged_runs_start_when_the_data_counts_the_classes(chain, tmp_path):
    """Lightning's logger merge refuses a name that model and datamodule hold with two values: ``data.num_classes:
    null`` (counted from label maps or taken from latents.json) must not stop a logged run; data settings are
    logged under ``data``."""
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs")]
    volumes = str(chain["data"] / "volumes.json")  # with label maps: 3 classes, counted
    main(["fit", "--config", C("ae3d.yaml"), "--config", C("tests/tiny_ae3d.yaml"), "--data.manifest", volumes,
          *csv, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "ae")])
    main(["fit", *chain["ldm"], "--data.manifest", str(chain["latents"] / "latents.json"), *csv,
          "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "ldm")])
    saved = torch.load(tmp_path / "ldm/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["num_classes"] == 3  # counted; the data setting stays as given (null)
    assert saved["datamodule_hyper_parameters"]["num_classes"] is None
    logged = [yaml.safe_load(f.read_text()) for f in sorted((tmp_path / "logs").rglob("hparams.yaml"))]
    assert logged[-1]["num_classes"] == 3 and logged[-1]["data"]["manifest"].endswith("latents.json")


def medsynth(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="default")
    return subprocess.run([str(MEDSYNTH), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def one_line(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medsynth: error: "), (code, err)
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_label_maps_are_refused_in_one_line(chain, tmp_path, capsys):
    data, records = chain["data"], json.loads((chain["data"] / "volumes.json").read_text())
    encode = ["predict", "--config", C("encode3d.yaml"), "--ckpt_path", chain["root"] / "ae/checkpoints/last.ckpt",
              "--data.num_workers", "0"]
    shifted = AFFINE.copy()
    shifted[:3, 3] += 100.0  # the volume's grid 10 cm away: nothing to resample from
    nib.save(nib.Nifti1Image(label_map(0), shifted), data / "labels" / "elsewhere.nii.gz")
    (data / "off_grid.json").write_text(json.dumps([dict(records[0], mask="labels/elsewhere.nii.gz"), records[1]]))
    code = run(*encode, "--data.manifest", data / "off_grid.json", "--output_dir", tmp_path / "enc1")
    one_line(code, capsys.readouterr().err, "elsewhere.nii.gz", "does not cover")

    partial = tmp_path / "partial_labels"  # case1's partner label map is missing
    partial.mkdir()
    (partial / "case0.nii.gz").write_bytes((data / "labels" / "case0.nii.gz").read_bytes())
    (data / "plain.json").write_text(json.dumps([{"image": r["image"]} for r in records[:2]]))
    code = run(*encode, "--data.manifest", data / "plain.json", "--data.masks", partial, "--output_dir", tmp_path / "enc2")
    one_line(code, capsys.readouterr().err, "case1.nii.gz", "no partner label map")

    (data / "missing.json").write_text(json.dumps([dict(records[0], mask="labels/nowhere.nii.gz"), records[1]]))
    code = run(*encode, "--data.manifest", data / "missing.json", "--output_dir", tmp_path / "enc3")
    one_line(code, capsys.readouterr().err, "nowhere.nii.gz", "does not exist")
    assert not any((tmp_path / f"enc{i}").exists() for i in (1, 2, 3))


def test_console_refuses_a_label_beyond_the_model_classes_in_one_line(chain, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    bad = label_map(3)
    bad[0, 0, 0] = 5  # the model has K = 3
    nib.save(nib.Nifti1Image(bad, AFFINE), maps / "too_many.nii.gz")
    r = medsynth("predict", *chain["ldm"], "--ckpt_path", chain["ckpt"], "--data.predict_masks", maps,
                 "--output_dir", tmp_path / "out", cwd=tmp_path)
    assert r.stdout == "", r.stdout
    one_line(r.returncode, r.stderr, "too_many.nii.gz", "label 5 >= data.num_classes=3")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_3d_seg_chain_with_tiny_nets(tmp_path):
    """`make demo-3d-seg` with tiny nets and few steps: MNI152 halves + tissue label maps → encode → mask-guided
    BiFlowNet → samples on the label maps → a 3D segmenter → the Dice table."""
    main(["fit", "--config", C("ae3d.yaml"), "--config", C("experiments/ae3d_demo.yaml"), "--config",
          C("tests/tiny_ae3d.yaml"), "--trainer.default_root_dir", str(tmp_path / "ae")])
    latents = tmp_path / "latents"
    main(["predict", "--config", C("encode3d.yaml"), "--ckpt_path", str(tmp_path / "ae/checkpoints/last.ckpt"),
          "--data", "medsynth.data.MNI152VolumeDataModule", "--data.tissue_labels", "true", "--data.num_workers", "0",
          "--output_dir", str(latents)])
    info = json.loads((latents / "latents.json").read_text())
    assert info["num_classes"] == 4 and {r["mask"] for r in info["records"]} == {
        "masks/posterior.nii.gz", "masks/anterior.nii.gz"}

    ldm = ["--config", C("biflownet3d_seg.yaml"), "--config", C("experiments/biflownet3d_seg_demo.yaml"),
           "--model.net.init_args.channels", "[8, 16]", "--model.net.init_args.norm_num_groups", "4",
           "--model.net.init_args.dit_patch", "4", "--model.net.init_args.dit_hidden", "16",
           "--model.net.init_args.dit_heads", "2", "--model.sampler.init_args.num_inference_steps", "2",
           "--data.crop_size", "8", "--data.predict_mask_multiple", "8", "--trainer.enable_progress_bar", "false"]
    main(["fit", *ldm, "--data.manifest", str(latents / "latents.json"), "--trainer.max_steps", "5",
          "--trainer.default_root_dir", str(tmp_path / "ldm")])
    out = tmp_path / "generated"
    main(["predict", *ldm, "--ckpt_path", str(tmp_path / "ldm/checkpoints/last.ckpt"),
          "--data.predict_masks", str(latents / "masks"), "--output_dir", str(out)])
    for half in ("posterior", "anterior"):
        sample, labels = nib.load(out / "samples" / f"{half}.nii.gz"), nib.load(latents / "masks" / f"{half}.nii.gz")
        assert sample.shape == labels.shape == (98, 58, 94)
        np.testing.assert_allclose(sample.affine, labels.affine, atol=1e-5)

    main(["fit", "--config", C("segmenter2d.yaml"), "--config", C("experiments/segmenter3d_demo.yaml"),
          "--model.net.init_args.channels", "[4, 8]", "--data.patch_size", "16", "--trainer.max_steps", "3",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "seg")])
    table = tmp_path / "dice.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/seg3d_dice.py"), "--segmenter",
                    str(tmp_path / "seg/checkpoints/last.ckpt"), "--window", "16", "--latents",
                    str(latents / "latents.json"), "--samples", str(out), "--out", str(table)], check=True)
    rows = json.loads(table.read_text())
    sources = {r["name"]: r["source"] for r in json.loads((latents / "latents.json").read_text())["records"]}
    assert set(rows) == {f"real {sources['posterior']}", f"real {sources['anterior']}", "sample posterior.nii.gz",
                         "sample anterior.nii.gz"}  # real volumes by path: a reconstruction may share a file name
    assert all(len(r["per_class"]) == 3 for r in rows.values())
    assert {"fraction_of_real"} <= set(rows["sample anterior.nii.gz"])  # against its own real volume
