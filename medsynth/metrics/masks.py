"""How real generated segmentation masks look: the judge of unconditional mask generators (``mask2d.yaml``).

A mask generator has no condition to be faithful to, so it is judged as a two-sample problem against real masks,
with the real held-out masks as the ceiling (what a model that draws new masks from the real distribution scores):

- **fidelity** (precision-like): each sample's Dice with its nearest real training mask (mean foreground Dice over
  the classes either holds), averaged over the samples. The ceiling is the same number for the real held-out masks.
  Noise, broken anatomy or missing classes score low.
- **coverage** (recall-like): each real held-out mask's Dice with its nearest sample, averaged; its ceiling uses as
  many real training masks as there are samples. A generator that draws one plausible mask again and again scores
  high fidelity and low coverage.
- **copies**: the share of samples closer to a training mask than any held-out real mask is (a copied training
  mask, not a new one).
- **area distance**: per class, the 1-D Wasserstein distance between the samples' and the held-out masks' area
  fractions, averaged over classes; its reference is the training masks' distance to the held-out ones.

``python -m medsynth.metrics.masks SAMPLES/masks --train SEG/all/train --test SEG/all/test --num-classes K``
prints the table and writes ``SAMPLES/masks/../mask_scores.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from medsynth.data.image2d import list_image_files, read_mask, resize_mask
from medsynth.errors import DataError, MedsynthError
from medsynth.io import save_json


def read_masks(folder: Path, num_classes: int, size: Optional[int] = None) -> Tensor:
    """Every mask file in ``folder`` as ``(N, S, S)`` int64, resized by nearest neighbour to ``size`` (as the
    datamodules do) or kept at its own (then all must share one shape)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of masks")
    files = list_image_files(folder, "mask")
    if not files:
        raise DataError(f"{folder}: no mask files (PNG/TIFF/BMP/NPY label maps)")
    masks = []
    for f in files:
        m = torch.from_numpy(read_mask(f, num_classes))
        if size is not None:
            m = resize_mask(m, size)
        elif masks and m.shape != masks[0].shape:
            raise DataError(f"{f}: mask is {tuple(m.shape)}, the others in {folder} are {tuple(masks[0].shape)}")
        masks.append(m)
    return torch.stack(masks)


def pairwise_dice(a: Tensor, b: Tensor, num_classes: int) -> Tensor:
    """Mean foreground Dice of every pair ``(N, M)`` of label maps ``a (N, *spatial)`` and ``b (M, *spatial)``,
    over the classes ``1..K-1`` either map of the pair holds (1 when neither holds any)."""
    def one_hot(x: Tensor) -> Tensor:  # (N, K-1, P) of the foreground classes
        return torch.nn.functional.one_hot(x.flatten(1), num_classes)[..., 1:].transpose(1, 2).float()

    oa, ob = one_hot(a), one_hot(b)
    inter = torch.einsum("nkp,mkp->nmk", oa, ob)
    sizes = oa.sum(-1)[:, None, :] + ob.sum(-1)[None, :, :]  # (N, M, K-1)
    present = sizes > 0
    dice = torch.where(present, 2 * inter / sizes.clamp(min=1), torch.zeros_like(inter))
    counted = present.sum(-1)
    return torch.where(counted > 0, dice.sum(-1) / counted.clamp(min=1), torch.ones_like(counted, dtype=dice.dtype))


def _areas(masks: Tensor, num_classes: int) -> Tensor:
    """Area fraction of each class per mask ``(N, K)``."""
    return torch.nn.functional.one_hot(masks.flatten(1), num_classes).float().mean(1)


def _wasserstein_1d(x: Tensor, y: Tensor) -> float:
    """1-D Wasserstein distance between two empirical distributions (through their quantile functions)."""
    q = torch.linspace(0, 1, 101, dtype=torch.float64)
    return float((torch.quantile(x.double(), q) - torch.quantile(y.double(), q)).abs().mean())


def mask_scores(samples: Tensor, train: Tensor, test: Tensor, num_classes: int, seed: int = 0) -> dict:
    """Fidelity, coverage, copies and area distance of ``samples`` against real ``train`` and ``test`` masks
    (label maps ``(N, S, S)`` of one size), each beside its real ceiling or reference (module docstring)."""
    for name, m in (("train", train), ("test", test)):
        if m.shape[1:] != samples.shape[1:]:
            raise MedsynthError(f"the {name} masks are {tuple(m.shape[1:])} and the samples "
                                f"{tuple(samples.shape[1:])}: give --image-size (the size the model was trained at)")
    sample_to_train = pairwise_dice(samples, train, num_classes).amax(1)
    test_to_train = pairwise_dice(test, train, num_classes)
    real_nearest = test_to_train.amax(1)
    g = torch.Generator().manual_seed(seed)
    subset = train[torch.randperm(len(train), generator=g)[: len(samples)]]  # as many references as samples
    coverage = float(pairwise_dice(test, samples, num_classes).amax(1).mean())
    coverage_ceiling = float(pairwise_dice(test, subset, num_classes).amax(1).mean())
    fidelity, fidelity_ceiling = float(sample_to_train.mean()), float(real_nearest.mean())
    a_s, a_tr, a_te = (_areas(m, num_classes) for m in (samples, train, test))
    area = float(np.mean([_wasserstein_1d(a_s[:, k], a_te[:, k]) for k in range(num_classes)]))
    area_ref = float(np.mean([_wasserstein_1d(a_tr[:, k], a_te[:, k]) for k in range(num_classes)]))
    return {
        "samples": len(samples), "train": len(train), "test": len(test), "num_classes": num_classes,
        "fidelity": fidelity, "fidelity_ceiling": fidelity_ceiling, "fidelity_fraction": fidelity / fidelity_ceiling,
        "coverage": coverage, "coverage_ceiling": coverage_ceiling, "coverage_fraction": coverage / coverage_ceiling,
        "copies": float((sample_to_train > real_nearest.max()).float().mean()),
        "area_distance": area, "area_distance_real": area_ref,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medsynth.metrics.masks", description=__doc__.splitlines()[0])
    p.add_argument("samples", type=Path, help="generated masks: the masks/ folder of `medsynth predict`")
    p.add_argument("--train", type=Path, required=True, help="the real training masks (e.g. SEG/all/train)")
    p.add_argument("--test", type=Path, required=True, help="real held-out masks (e.g. SEG/all/test)")
    p.add_argument("--num-classes", type=int, required=True, help="classes counting background")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the real masks to this side (default: the samples' side)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default SAMPLES/../mask_scores.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier JSON of these scores")
    args = p.parse_args(argv)
    try:
        out = args.out or args.samples.parent / "mask_scores.json"
        if out.exists() and not args.overwrite:
            raise MedsynthError(f"{out}: exists (scores of an earlier run); pass --overwrite to replace it")
        samples = read_masks(args.samples, args.num_classes)
        size = args.image_size or samples.shape[-1]
        if samples.shape[-2] != samples.shape[-1] or samples.shape[-1] != size:
            raise DataError(f"{args.samples}: samples are {tuple(samples.shape[1:])}; expected {size}x{size}")
        scores = mask_scores(samples, read_masks(args.train, args.num_classes, size),
                             read_masks(args.test, args.num_classes, size), args.num_classes)
        save_json(out, {"samples_dir": str(args.samples), "train": str(args.train), "test": str(args.test),
                        "scores": scores})
    except MedsynthError as e:
        print(f"medsynth: error: {e}", file=sys.stderr)
        return 2
    print(f"{'':14s} {'samples':>8s} {'real':>8s} {'fraction':>8s}")
    for k in ("fidelity", "coverage"):
        print(f"{k:14s} {scores[k]:8.3f} {scores[k + '_ceiling']:8.3f} {scores[k + '_fraction']:8.3f}")
    print(f"{'area distance':14s} {scores['area_distance']:8.4f} {scores['area_distance_real']:8.4f}")
    print(f"{'copies':14s} {scores['copies']:8.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
