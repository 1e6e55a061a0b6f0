"""The 3D class judge: a classifier trained on whole labelled volumes (configs/experiments/classifier3d.yaml) and
`medsynth test` scoring a folder of class-conditional 3D samples (``<class>/sample_NNNNN.nii.gz``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.data import SampleDirDataModule
from medsynth.errors import DataError
from medsynth.io import read_nifti, save_nifti
from tests.integration.test_cli import run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MEDSYNTH = Path(sys.executable).with_name("medsynth")
SIDE = 16
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def blob_volume(rng: np.random.Generator, kind: int, side: int = SIDE) -> np.ndarray:
    """A noisy grey cube (intensities ~100) with a bright (class 0) or dark (class 1) ball at a random place."""
    vol = rng.normal(100, 10, (side,) * 3).clip(1)
    c = rng.integers(5, side - 5, 3)
    r = rng.integers(3, 5)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"))
    ball = ((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r
    vol[ball] = 220 if kind == 0 else 10
    return vol.astype(np.float32)


def make_volumes(root: Path, counts=(("train", 8), ("val", 3), ("test", 3)), seed: int = 0) -> Path:
    """Labelled volumes of both kinds and their manifest (records with ``label`` and ``split``)."""
    rng = np.random.default_rng(seed)
    records = []
    for split, n in counts:
        for label in (0, 1):
            for i in range(n):
                name = f"{split}_{label}_{i}.nii.gz"
                save_nifti(root / name, blob_volume(rng, label), AFFINE)
                records.append({"image": name, "label": label, "split": split})
    (root / "manifest.json").write_text(json.dumps(records))
    return root / "manifest.json"


def fake_predict_dir(d: Path, volumes: dict[str, list[np.ndarray]], class_names=("0", "1")) -> Path:
    """A folder as `medsynth predict` of configs/biflownet3d.yaml writes it: ``<class>/sample_NNNNN.nii.gz`` with
    a ``.json`` sidecar each, ``grid.png`` and ``metadata.json``."""
    for name, vols in volumes.items():
        (d / name).mkdir(parents=True)
        for i, v in enumerate(vols):
            save_nifti(d / name / f"sample_{i:05d}.nii.gz", v, AFFINE)
            (d / name / f"sample_{i:05d}.json").write_text("{}")
    (d / "grid.png").write_bytes(b"")
    config = {"data": {"class_path": "medsynth.data.LatentDataModule", "init_args": {"num_samples": 2}},
              "model": {"class_path": "medsynth.modules.DiffusionModule",
                        "init_args": {"num_classes": 0, "image_channels": 8, "class_names": list(class_names)}}}
    meta = {"synthetic": True, "checkpoint": "ldm.ckpt", "class_names": list(class_names), "config": config,
            "num_samples": sum(len(v) for v in volumes.values()), "model": "DiffusionModule",
            "intensity": {"mode": "mri", "low": 5.0, "high": 200.0}}
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


def judge_args(manifest: Path) -> list:
    return ["--config", CONFIGS / "classifier2d.yaml", "--config", CONFIGS / "experiments/classifier3d.yaml",
            "--data.manifest", manifest, "--data.patch_size", SIDE, "--data.batch_size", 4,
            "--model.net.init_args.channels", "[8, 16]", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def test_sample_volumes_are_read_whole_and_scaled_as_the_judge_scales_real_volumes(tmp_path):
    rng = np.random.default_rng(1)
    vols = {"0": [blob_volume(rng, 0) for _ in range(2)], "1": [blob_volume(rng, 1)]}
    d = fake_predict_dir(tmp_path / "samples", vols)
    dm = SampleDirDataModule(samples_dir=d)
    assert dm.model_args() == {"num_classes": 0, "image_channels": 1, "image_size": SIDE, "class_names": ["0", "1"]}
    dm.setup("test")
    ds = dm.datasets["test"]
    assert len(ds) == 3 and [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    item = ds[2]
    assert item["image"].shape == (1, SIDE, SIDE, SIDE) and item["name"] == "1/sample_00000.nii.gz"
    # mri: the volume's own nonzero percentiles to [-1, 1], as VolumeDataModule scaled the judge's real volumes
    x = item["image"]
    lo, hi = np.percentile(vols["1"][0], (0.5, 99.5))
    expected = np.clip((vols["1"][0] - lo) / (hi - lo) * 2 - 1, -1, 1)
    assert torch.allclose(x[0], torch.from_numpy(expected).float(), atol=1e-5)
    # ct: a fixed window (a CT judge's)
    dm = SampleDirDataModule(samples_dir=d, normalization="ct", ct_window=(0.0, 100.0), overwrite=True)
    dm.setup("test")
    x = dm.datasets["test"][0]["image"]
    assert torch.allclose(x[0], torch.from_numpy(np.clip(vols["0"][0] / 50 - 1, -1, 1)).float(), atol=1e-5)


def test_a_volume_of_another_shape_or_kind_is_refused_naming_it(tmp_path):
    rng = np.random.default_rng(2)
    d = fake_predict_dir(tmp_path / "shape", {"0": [blob_volume(rng, 0)], "1": [blob_volume(rng, 1, side=12)]})
    dm = SampleDirDataModule(samples_dir=d)
    with pytest.raises(DataError, match=r"1/sample_00000.nii.gz: sample volume of shape 1x12x12x12; expected "
                                        r"1x16x16x16"):
        dm.setup("test")
    d = fake_predict_dir(tmp_path / "mixed", {"0": [blob_volume(rng, 0)]})
    np.save(d / "0" / "sample_00001.npy", np.zeros((1, SIDE, SIDE), np.float32))
    with pytest.raises(DataError, match="holds both .npy images and NIfTI volumes"):
        SampleDirDataModule(samples_dir=d)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A tiny 3D judge trained for 30 steps on whole 16^3 volumes: (manifest, run folder, last checkpoint)."""
    root = tmp_path_factory.mktemp("judge3d")
    manifest = make_volumes(root / "vols")
    assert run("fit", *judge_args(manifest), "--trainer.max_steps", 30, "--trainer.default_root_dir", root / "run") == 0
    return manifest, root / "run", root / "run" / "checkpoints" / "last.ckpt"


def test_the_installed_command_refuses_a_corrupt_sample_volume_in_one_line(tmp_path, judge):
    rng = np.random.default_rng(3)
    d = fake_predict_dir(tmp_path / "samples", {"0": [blob_volume(rng, 0)], "1": [blob_volume(rng, 1)] * 2})
    bad = d / "1" / "sample_00001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run([str(MEDSYNTH), "test", "--config", CONFIGS / "classifier2d.yaml", "--config",
                           CONFIGS / "experiments/classifier3d.yaml", "--data", "medsynth.data.SampleDirDataModule",
                           "--data.samples_dir", d, "--ckpt_path", judge[2], "--trainer.default_root_dir", tmp_path / "run"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert str(bad) in err[0] and "unreadable NIfTI" in err[0]
    assert not (d / "scores.json").exists()


def test_a_3d_judge_trained_on_whole_volumes_scores_class_samples(tmp_path, judge):
    manifest, run_dir, last = judge
    base = judge_args(manifest)
    ckpt = torch.load(last, weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"] == ["0", "1"] and ckpt["global_step"] == 30
    assert run("test", *base, "--ckpt_path", last, "--trainer.default_root_dir", run_dir) == 0
    ceiling = json.loads((run_dir / "scores" / "real_test.json").read_text())["scores"]
    assert ceiling["test/accuracy"] > 0.8

    # the real test volumes written as a sample folder: the same score; with their classes swapped: near none
    records = [r for r in json.loads(manifest.read_text()) if r["split"] == "test"]
    real = {c: [read_nifti(manifest.parent / r["image"])[0] for r in records if r["label"] == int(c)]
            for c in ("0", "1")}
    scores = {}
    for kind, folders in (("real", real), ("swapped", {"0": real["1"], "1": real["0"]})):
        d = fake_predict_dir(tmp_path / kind, folders)
        assert run("test", *base, "--ckpt_path", last, "--data", "medsynth.data.SampleDirDataModule",
                   "--data.samples_dir", d, "--trainer.default_root_dir", tmp_path / f"score_{kind}") == 0
        result = json.loads((d / "scores.json").read_text())
        assert result["num_samples"] == 6 and result["ceiling"] == ceiling
        scores[kind] = result["scores"]["test/accuracy"]
    assert scores["real"] == pytest.approx(ceiling["test/accuracy"])
    assert scores["swapped"] < 0.2
