"""Mask faithfulness of generated volumes: a 3D segmenter's Dice on samples against the label maps they were
conditioned on, beside its Dice on real volumes against their label maps (the ceiling).

    python scripts/seg3d_dice.py --segmenter SEG_RUN/checkpoints/last.ckpt --window 32 \
        [--latents LATENTS/latents.json] [--real IMAGE.nii.gz LABELS.nii.gz ...] --samples GENERATED_DIR \
        [--out dice.json]

Real pairs come from ``--real`` or from a latent manifest's records (each encoded volume and its label map).

GENERATED_DIR is a ``medsynth predict`` output on label maps: ``samples/NAME.nii.gz`` beside ``masks/NAME.nii.gz``.
Every volume is scaled as the segmenter's training data was (MRI percentiles 0.5/99.5 of nonzero voxels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric

from medsynth.data.latents import read_latent_manifest
from medsynth.data.volumes import Normalization, read_label_map, read_volume
from medsynth.io import save_json
from medsynth.modules.segmenter import SegmenterModule


def dice(judge: SegmenterModule, image: Path, labels: Path, window: int, normalization: Normalization) -> list[float]:
    """Per foreground class Dice of the judge's segmentation of ``image`` against ``labels`` (NaN: class absent)."""
    data, affine = read_volume(image)
    mask, _ = read_label_map(labels, judge.num_classes, (data.shape[1:], affine))
    x, _ = normalization.to_unit(data)
    pred = judge.segment(x[None].float(), window)
    k = judge.num_classes
    one_hot = lambda m: torch.nn.functional.one_hot(m.long(), k).movedim(-1, 1)  # noqa: E731
    score = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(
        one_hot(pred), one_hot(torch.from_numpy(mask)[None]))
    return [float(v) for v in score[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", required=True, type=Path, help="SegmenterModule checkpoint (3D)")
    parser.add_argument("--window", type=int, default=32, help="sliding-window side in voxels (the training patch)")
    parser.add_argument("--real", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"),
                        help="a real volume and its label map (the ceiling); repeatable")
    parser.add_argument("--latents", type=Path, help="latents.json: its volumes and label maps are real pairs")
    parser.add_argument("--samples", type=Path, required=True, help="medsynth predict output on label maps")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    judge = SegmenterModule.load_from_checkpoint(args.segmenter, map_location="cpu").eval()
    norm = Normalization("mri")
    rows, splits = {}, {}
    pairs = [tuple(pair) for pair in args.real]
    if args.latents:
        records = [r for r in read_latent_manifest(args.latents)["records"] if r.get("mask")]
        pairs += [(r["source"], r["mask"]) for r in records]
        splits = {r["name"]: (r.get("split", "train"), f"real {r['source']}") for r in records}
    for image, labels in pairs:
        rows[f"real {image}"] = dice(judge, Path(image), Path(labels), args.window, norm)
    for sample in sorted((args.samples / "samples").glob("*.nii.gz")):
        rows[f"sample {sample.name}"] = dice(judge, sample, args.samples / "masks" / sample.name, args.window, norm)
    table = {name: {"per_class": v, "mean": float(np.nanmean(v))} for name, v in rows.items()}
    for name, row in table.items():
        print(f"{name:40s} mean Dice {row['mean']:.3f}  per class {', '.join(f'{v:.3f}' for v in row['per_class'])}")
    for name, (split, real) in sorted(splits.items()):  # a sample on an encoded volume's label map: its fraction
        sample = table.get(f"sample {name}.nii.gz")
        if sample is not None and table[real]["mean"] > 0:
            fraction = sample["mean"] / table[real]["mean"]
            table[f"sample {name}.nii.gz"]["fraction_of_real"] = fraction
            print(f"{name} ({split}): samples reach {fraction:.2f} of the real volume's Dice")
    if args.out:
        save_json(args.out, table)


if __name__ == "__main__":
    main()
