"""Rectified flow with few Euler steps against DDIM-50, on the seg-guided demo: seconds per image and faithfulness.

Both models are demo recipes trained for the same steps (`make demo` gives the DDIM one; the rectified-flow one is
the same command with ``--model.objective medsynth.diffusion.RectifiedFlowObjective --model.sampler
medsynth.diffusion.EulerSampler``). Each samples the 15 test masks; quality is the intensity-segmenter Dice of
``demo_faithfulness.py`` and, with ``--segmenter``, the Dice of a trained segmenter (configs/segmenter2d.yaml);
loss values of different objectives are not comparable. Prints a table, writes JSON.

    python benchmarks/sampler_speed.py --ddim-ckpt runs/demo/checkpoints/last.ckpt --rf-ckpt runs/demo_rf/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from demo_faithfulness import fit_thresholds, mean_dice, split_arrays

from medsynth.data.demo import MNI152SliceDataModule
from medsynth.diffusion import DDIMSampler, EulerSampler
from medsynth.modules.loading import load_module


def run(module, sampler, masks, repeats: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module.sample(masks, sampler=sampler)
        times.append((time.perf_counter() - t0) / masks.shape[0])
    return statistics.median(times), [x[0].float().numpy() for x in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddim-ckpt", type=Path, required=True)
    p.add_argument("--rf-ckpt", type=Path, required=True)
    p.add_argument("--ddim-steps", type=int, nargs="+", default=[50])
    p.add_argument("--euler-steps", type=int, nargs="+", default=[4, 10])
    p.add_argument("--segmenter", type=Path, help="a SegmenterModule checkpoint: also report its Dice (the judge)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/sampler_speed.json")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    dm = MNI152SliceDataModule(image_size=64, num_workers=0, random_flip=False)
    dm.setup("fit")
    dm.setup("test")
    lo, hi = fit_thresholds(*split_arrays(dm.datasets["train"])[:2])
    te_img, te_mask, _ = split_arrays(dm.datasets["test"])
    masks = torch.from_numpy(np.stack(te_mask))

    rows = []
    ddim_model, rf_model = load_module(args.ddim_ckpt), load_module(args.rf_ckpt)
    settings = [("DDIM", n, ddim_model, DDIMSampler(n)) for n in args.ddim_steps] + [
        ("Euler (rectified flow)", n, rf_model, EulerSampler(n)) for n in args.euler_steps
    ]
    judge = load_module(args.segmenter) if args.segmenter else None

    def judged(images) -> float:
        if judge is None:
            return float("nan")
        x = torch.from_numpy(np.stack(images))[:, None]
        return round(float(torch.nanmean(judge.per_class_dice(judge(x), masks))), 3)

    for name, steps, model, sampler in settings:
        sec, samples = run(model, sampler, masks, args.repeats)
        rows.append({"sampler": name, "steps": steps, "s_per_image": round(sec, 4),
                     "dice": round(mean_dice(samples, te_mask, lo, hi), 3), "segmenter_dice": judged(samples)})
    rows.append({"sampler": "real test slices", "steps": 0, "s_per_image": 0.0,
                 "dice": round(mean_dice(te_img, te_mask, lo, hi), 3), "segmenter_dice": judged(te_img)})
    print(f"{'sampler':24s} {'steps':>5s} {'s/image':>8s} {'Dice':>6s} {'seg. Dice':>9s}")
    for r in rows:
        print(f"{r['sampler']:24s} {r['steps']:>5d} {r['s_per_image']:>8.3f} {r['dice']:>6.3f} {r['segmenter_dice']:>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "batch": int(masks.shape[0]), "precision": "bf16 autocast, CPU",
                               "ddim_ckpt": str(args.ddim_ckpt), "rf_ckpt": str(args.rf_ckpt)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
