"""2.5D FID of volumes (issue #15.5): the 2D feature network on slices along each axis, FID per plane and their mean;
real volumes score better than noise, and the report shows it for folders of generated volumes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.callbacks.report import SampleReport, main, read_sample_volumes
from medsynth.errors import MedsynthError
from medsynth.metrics.distribution import FeatureNet, fid_2p5d, volume_slices
from tests.unit.test_volume_units import ct_phantom

AXES = ("fid_2.5d/axis0", "fid_2.5d/axis1", "fid_2.5d/axis2")


class PooledFeatures(torch.nn.Module):
    """A stand-in for Inception: uint8 images (N, 3, H, W) to 4x4-pooled grey levels (N, 16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1].float() / 255, 4).flatten(1)


@pytest.fixture
def features(tmp_path) -> Path:
    path = tmp_path / "features.pt"
    torch.jit.script(PooledFeatures()).save(str(path))
    return path


def phantoms(seeds, shape=(16, 16, 16)) -> list[torch.Tensor]:
    """CT phantoms in [-1, 1] (window -1000..1000 HU), each shifted a little so the set varies."""
    out = []
    for seed in seeds:
        hu = np.roll(ct_phantom(shape, seed), shift=seed % 3 - 1, axis=seed % 3)
        out.append(torch.from_numpy(np.clip(hu, -1000, 1000) / 1000.0).float()[None])
    return out


def test_slices_are_taken_across_each_axis_centred_and_evenly_spaced():
    v = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    assert torch.equal(volume_slices(v, 0)[3], v[:, 3])
    assert torch.equal(volume_slices(v, 1)[2], v[:, :, 2])
    assert torch.equal(volume_slices(v, 2)[5], v[:, :, :, 5])
    assert volume_slices(v, 2).shape == (6, 2, 4, 5)
    centre = volume_slices(v, 2, center_fraction=0.5)  # the middle 3 of 6 slices
    assert torch.equal(centre, v.movedim(3, 0)[1:4])
    spaced = volume_slices(v, 2, max_slices=2)
    assert torch.equal(spaced, v.movedim(3, 0)[[0, 5]])
    with pytest.raises(MedsynthError, match="center_fraction"):
        volume_slices(v, 0, center_fraction=0)


def test_real_volumes_score_better_than_noise_on_every_plane(features):
    net = FeatureNet(features, input_size=32)
    real, held_out = phantoms(range(0, 4)), phantoms(range(10, 14))
    g = torch.Generator().manual_seed(0)
    noise = [torch.rand(1, 16, 16, 16, generator=g) * 2 - 1 for _ in range(4)]
    same = fid_2p5d(net, real, held_out)
    different = fid_2p5d(net, real, noise)
    assert set(same) == {*AXES, "fid_2.5d"}
    for key in AXES:
        assert different[key] > 5 * same[key], key
    assert same["fid_2.5d"] == pytest.approx(sum(same[k] for k in AXES) / 3)
    # a volume compared with itself: FID 0 on every plane (up to the matrix square root's precision)
    assert fid_2p5d(net, real, real)["fid_2.5d"] < 1e-3 * different["fid_2.5d"]


def sample_folder(root: Path, volumes_hu: list[np.ndarray]) -> Path:
    """A `medsynth predict` folder of generated CT volumes written in HU, with its metadata's intensity record."""
    (root / "samples").mkdir(parents=True)
    for i, hu in enumerate(volumes_hu):
        nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), root / "samples" / f"sample_{i:05d}.nii.gz")
    intensity = {"mode": "ct", "units": "HU", "window": [-1000.0, 1000.0], "low": -1000.0, "high": 1000.0,
                 "exact": True}
    (root / "metadata.json").write_text(json.dumps({"synthetic": True, "intensity": intensity}))
    return root


@pytest.fixture
def real_dir(tmp_path) -> Path:
    folder = tmp_path / "real"
    folder.mkdir()
    for seed in range(4):
        hu = np.roll(ct_phantom((16, 16, 16), seed), shift=seed % 3 - 1, axis=seed % 3)
        nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), folder / f"real_{seed}.nii.gz")
    return folder


def test_a_folder_of_generated_volumes_gets_a_report_with_2p5d_fid(tmp_path, features, real_dir, capsys):
    rng = np.random.default_rng(0)
    good = sample_folder(tmp_path / "good", [np.roll(ct_phantom((16, 16, 16), s), s % 3 - 1, s % 3)
                                             for s in range(10, 14)])
    noise = sample_folder(tmp_path / "noise", [rng.uniform(-1000, 1000, (16, 16, 16)) for _ in range(4)])
    volumes, intensity = read_sample_volumes(good, 10)  # written in HU, read back in [-1, 1]
    assert intensity["units"] == "HU" and -1 <= float(torch.stack(volumes).min()) < -0.99
    results = {}
    for name, folder in (("good", good), ("noise", noise)):
        assert main([str(folder), "--features", str(features), "--real-dir", str(real_dir)]) == 0
        results[name] = json.loads((folder / "scores.json").read_text())["scores"]
        report = (folder / "report.md").read_text()
        assert "fid_2.5d/axis2" in report and "2.5D FID" in report
    for key in (*AXES, "fid_2.5d"):
        assert results["noise"][key] > 5 * results["good"][key], key
    assert results["noise"]["diversity/ms_ssim"] < results["good"]["diversity/ms_ssim"]
    capsys.readouterr()
    # scored already: refused in one line unless asked to overwrite
    assert main([str(good), "--features", str(features), "--real-dir", str(real_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(good / "scores.json") in err[0] and "already exists" in err[0]
    assert main([str(good), "--features", str(tmp_path / "none.pt"), "--real-dir", str(real_dir),
                 "--overwrite"]) == 2
    assert str(tmp_path / "none.pt") in capsys.readouterr().err


def test_the_scoring_callback_reports_2p5d_fid_for_batches_of_volumes(tmp_path, features, real_dir):
    """What `medsynth test` on a folder of volumes does once a data module serves them: batches (B, C, X, Y, Z)."""
    folder = sample_folder(tmp_path / "good", [ct_phantom((16, 16, 16), s) for s in range(10, 14)])
    volumes, _ = read_sample_volumes(folder, 10)
    data = SimpleNamespace(samples_dir=folder, features=features, real_dir=real_dir)
    trainer = SimpleNamespace(datamodule=data, world_size=1, is_global_zero=True, ckpt_path=None,
                              callback_metrics={}, loggers=[])
    report = SampleReport()
    report.on_test_start(trainer, None)
    for batch in torch.stack(volumes).split(2):
        report.on_test_batch_end(trainer, None, None, {"image": batch}, 0)
    report.on_test_end(trainer, None)
    result = json.loads((folder / "scores.json").read_text())
    assert set(AXES) <= set(result["scores"]) and result["num_samples"] == 4
    assert any(note.startswith("2.5D FID") for note in result["notes"])


def test_python_m_medsynth_metrics_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "medsynth.metrics", str(tmp_path / "none")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"medsynth: error: {tmp_path / 'none'}: sample folder does not exist"]
