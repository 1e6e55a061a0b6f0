"""Shared fixtures: small generated datasets in the reference layout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/NAME.py`` imported for one test, its neighbours importable as when it runs as a script."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_seg_dataset(
    root: Path,
    counts: dict | None = None,
    size: int = 24,
    num_classes: int = 3,
    channels: int = 1,
    fmt: str = "png",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write images whose intensity follows random rectangle masks, in the reference layout.

    Returns ``(img_dir, seg_dir)``; masks live in ``seg_dir/all/<split>/``.
    """
    rng = np.random.default_rng(seed)
    counts = counts or {"train": 8, "val": 4, "test": 4}
    img_dir, seg_dir = root / "images", root / "masks"
    for split, n in counts.items():
        (img_dir / split).mkdir(parents=True, exist_ok=True)
        (seg_dir / "all" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size), dtype=np.uint8)
            for k in range(1, num_classes):
                y, x = rng.integers(0, size - 6, 2)
                h, w = rng.integers(4, size // 2, 2)
                mask[y : y + h, x : x + w] = k
            img = mask.astype(np.float32) / max(num_classes - 1, 1) * 200 + rng.normal(0, 10, mask.shape)
            img = np.clip(img, 0, 255).astype(np.uint8)
            name = f"case_{split}_{i:03d}"
            if fmt == "png":
                arr = img if channels == 1 else np.repeat(img[..., None], channels, -1)
                Image.fromarray(arr).save(img_dir / split / f"{name}.png")
                Image.fromarray(mask).save(seg_dir / "all" / split / f"{name}.png")
            else:
                arr = img.astype(np.float32) if channels == 1 else np.repeat(img[None], channels, 0).astype(np.float32)
                np.save(img_dir / split / f"{name}.npy", arr)
                np.save(seg_dir / "all" / split / f"{name}.npy", mask)
    return img_dir, seg_dir


@pytest.fixture
def seg_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-class, 1-channel PNG dataset of 24x24 images: 8 train, 4 val, 4 test."""
    return make_seg_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keep W&B offline and demo caches inside the test's temporary folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MEDSYNTH_CACHE", str(tmp_path / "cache"))
