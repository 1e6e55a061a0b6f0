"""DDP on CPU (gloo, 2 processes): Lightning relaunches sys.argv, so this runs `medsynth` in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_seg_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_ddp_fit_then_predict_on_two_processes(tmp_path):
    # 5 test masks over 2 ranks: an uneven split must give each sample exactly once
    img_dir, seg_dir = make_seg_dataset(tmp_path / "data", counts={"train": 8, "val": 4, "test": 5})
    base = [sys.executable, "-m", "medsynth"]
    cfg = ["--config", str(CONFIGS / "seg2d.yaml"), "--config", str(CONFIGS / "tests" / "tiny.yaml"),
           "--data.img_dir", str(img_dir), "--data.seg_dir", str(seg_dir), "--data.num_classes", "3",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    run_dir = tmp_path / "run"
    fit = subprocess.run(base + ["fit", *cfg, "--trainer.default_root_dir", str(run_dir)], capture_output=True,
                         text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4  # optimiser steps, as in one process; each step saw 2 x 4 images
    # 8 training images at an effective batch of 8: one step per epoch, so step 4 ends the 4th epoch (index 3);
    # one process at batch 4 would be in its 2nd (index 1)
    assert ckpt["epoch"] == 3
    out = tmp_path / "samples"
    pred = subprocess.run(base + ["predict", *cfg, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                                  "--output_dir", str(out)], capture_output=True, text=True, timeout=600)
    assert pred.returncode == 0, pred.stderr[-3000:]
    # every test mask gets exactly one sample, whichever rank drew it
    names = sorted(p.name for p in (seg_dir / "all" / "test").iterdir())
    assert len(names) == 5 and sorted(p.name for p in (out / "samples").glob("*.png")) == names
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["num_samples"] == 5
    assert all(np.isfinite(np.load(p)).all() for p in (out / "samples").glob("*.npy"))


# slow: DDP itself runs by default above, the codebook all-reduce in tests/unit/test_autoencoder_nets.py
@pytest.mark.slow
def test_ddp_autoencoder_with_gan_counts_generator_steps(tmp_path):
    # the 3D VQ autoencoder on 2 processes: codebook statistics are all-reduced, the discriminator idles in
    # generator steps (hence find_unused_parameters), and steps still count generator updates
    from tests.integration.test_autoencoder_cli import write_volumes

    write_volumes(tmp_path / "vols", {"a": (20, 24, 16), "b": (18, 16, 22), "c": (16, 20, 17)})
    manifest = tmp_path / "vols" / "manifest.json"
    manifest.write_text(json.dumps([{"image": "a.nii.gz", "split": "train"}, {"image": "b.nii.gz", "split": "train"},
                                    {"image": "c.nii.gz", "split": "val"}]))
    run_dir = tmp_path / "ae"
    cmd = [sys.executable, "-m", "medsynth", "fit", "--config", str(CONFIGS / "ae3d.yaml"),
           "--config", str(CONFIGS / "tests" / "tiny_ae3d.yaml"), "--data.manifest", str(manifest),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.default_root_dir", str(run_dir)]
    fit = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    d_state = ckpt["optimizer_states"][1]["state"]
    assert int(next(iter(d_state.values()))["step"]) == 2  # GAN from step 1: discriminator steps at 1 and 2
    assert torch.isfinite(ckpt["state_dict"]["net.quantizer.codebook"]).all()
