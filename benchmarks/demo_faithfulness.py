"""How well demo samples follow their masks: Dice of an intensity segmenter fitted on real slices.

A stand-in for the reference's segmenter-Dice (a trained segmenter arrives with the evaluation issue): two
intensity thresholds (background | grey matter | white matter) are fitted on the real training slices to maximise
mean Dice against their masks. They then segment (a) the real test slices (the ceiling), (b) the samples, against
the masks the samples were conditioned on, and (c) the samples against shuffled test masks (the floor: an image that
ignores its mask). Prints a table and writes JSON.

    python benchmarks/demo_faithfulness.py runs/demo/predictions
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medsynth.data.demo import MNI152SliceDataModule


def dice(pred: np.ndarray, ref: np.ndarray, k: int) -> float:
    p, r = pred == k, ref == k
    denom = p.sum() + r.sum()
    return float(2 * (p & r).sum() / denom) if denom else 1.0


def segment(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.where(img < lo, 0, np.where(img < hi, 1, 2))


def mean_dice(imgs, masks, lo, hi) -> float:
    return float(np.mean([np.mean([dice(segment(i, lo, hi), m, k) for k in (1, 2)]) for i, m in zip(imgs, masks)]))


def split_arrays(ds):
    """Images, masks and names of a dataset as numpy arrays (first channel)."""
    items = [ds[i] for i in range(len(ds))]
    return [it["image"][0].numpy() for it in items], [it["mask"].numpy() for it in items], [it["name"] for it in items]


def fit_thresholds(images, masks) -> tuple[float, float]:
    """The two intensity thresholds that best segment real images into background / GM / WM (mean Dice)."""
    grid = np.linspace(-1, 1, 81)
    return max(((a, b) for a in grid for b in grid if b > a), key=lambda ab: mean_dice(images[::3], masks[::3], *ab))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions", type=Path, help="a `medsynth predict` output folder of the demo")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/demo_faithfulness.json")
    args = p.parse_args()

    dm = MNI152SliceDataModule(image_size=args.image_size, num_workers=0, random_flip=False)
    dm.setup("fit")
    dm.setup("test")
    lo, hi = fit_thresholds(*split_arrays(dm.datasets["train"])[:2])

    te_img, te_mask, te_names = split_arrays(dm.datasets["test"])
    samples, cond = [], []
    for name, mask in zip(te_names, te_mask):
        stem = Path(name).stem
        samples.append(np.load(args.predictions / "samples" / f"{stem}.npy")[0])
        cond.append(mask)
    shuffled = [cond[(i + len(cond) // 2) % len(cond)] for i in range(len(cond))]
    result = {
        "thresholds": [round(float(lo), 3), round(float(hi), 3)],
        "dice_real_test": round(mean_dice(te_img, te_mask, lo, hi), 3),
        "dice_samples": round(mean_dice(samples, cond, lo, hi), 3),
        "dice_samples_vs_shuffled_masks": round(mean_dice(samples, shuffled, lo, hi), 3),
        "num_samples": len(samples),
        "predictions": str(args.predictions),
    }
    print(f"{'mean Dice (GM, WM), intensity segmenter':44s} {'value':>6s}")
    for k in ("dice_real_test", "dice_samples", "dice_samples_vs_shuffled_masks"):
        print(f"{k:44s} {result[k]:>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
