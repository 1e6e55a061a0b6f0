"""Slow: the class demo learns the planes. A classifier trained on real slices labels the samples' planes."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsynth.data import MNI152PlaneDataModule
from tests.integration.test_cli import run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def train_plane_classifier(dm: MNI152PlaneDataModule) -> torch.nn.Module:
    """Logistic regression on 16x16 thumbnails of the real training slices."""
    ds = dm.datasets["train"]
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.tensor([ds[i]["label"] for i in range(len(ds))])
    x = F.adaptive_avg_pool2d(x, 16).flatten(1)
    clf = torch.nn.Linear(x.shape[1], 3)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(clf(x), y).backward()
        opt.step()
    return clf


@pytest.mark.slow
def test_class_demo_samples_are_recognised_by_plane(tmp_path):
    run_dir, out = tmp_path / "class_demo", tmp_path / "samples"
    base = ["--config", CONFIGS / "class2d.yaml", "--config", CONFIGS / "experiments" / "class_demo.yaml",
            "--data.image_size", 32, "--data.num_workers", 0, "--trainer.logger", "false"]
    assert run("fit", *base, "--trainer.max_steps", 400, "--trainer.default_root_dir", run_dir,
               "--trainer.enable_progress_bar", "false") == 0
    assert run("predict", *base, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out,
               "--data.samples_per_class", 8, "--model.sampler.init_args.num_inference_steps", 25) == 0
    dm = MNI152PlaneDataModule(image_size=32, num_workers=0)
    dm.setup("fit")
    clf = train_plane_classifier(dm)
    val = dm.datasets["val"]
    xv = F.adaptive_avg_pool2d(torch.stack([val[i]["image"] for i in range(len(val))]), 16).flatten(1)
    yv = torch.tensor([val[i]["label"] for i in range(len(val))])
    assert (clf(xv).argmax(1) == yv).float().mean() > 0.9  # the classifier itself works on real slices
    correct = total = 0
    for label, plane in enumerate(dm.class_names):
        for f in sorted((out / plane).glob("*.npy")):
            x = F.adaptive_avg_pool2d(torch.from_numpy(np.load(f))[None], 16).flatten(1)
            correct += int(clf(x).argmax(1).item() == label)
            total += 1
    assert total == 24
    assert correct / total > 0.6  # chance is 1/3
