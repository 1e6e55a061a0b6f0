"""Samplers against steps on the seg-guided demo: seconds per image and faithfulness, for a DDPM and a flow model.

Two demo models trained for the same steps: a DDPM-objective one (`make demo`: v-prediction) and a rectified-flow
one (the same command with ``--model.objective medsynth.diffusion.RectifiedFlowObjective --model.sampler
medsynth.diffusion.EulerSampler``). The DDPM model is sampled with DDIM, DPM-Solver++ (2M) and UniPC; the flow model
with Euler, Heun, and DPM-Solver++ and UniPC on flow sigmas; each at every step count of ``--steps``. Each setting
samples the 15 test masks in one batch (bf16 autocast, CPU); ``NFE`` counts net evaluations per image (Heun's
``n`` steps cost ``2n - 1``). Quality is the intensity-segmenter Dice of ``demo_faithfulness.py`` and, with
``--segmenter``, the Dice of a trained segmenter (configs/segmenter2d.yaml); ``Δ`` is a setting's Dice minus the
reference's: DDIM-50 on the DDPM model, or (flow model alone) Euler at the most steps. Either model may be left
out. Loss values of different objectives are not comparable. Prints a table, writes JSON.

    python benchmarks/sampler_speed.py --ddim-ckpt runs/demo/checkpoints/last.ckpt --rf-ckpt runs/demo_rf/checkpoints/last.ckpt

``--analytic`` needs no model: every sampler integrates the exact denoiser of Gaussian data N(0.3, 0.5²) (DDPM
objectives with the linear and cosine schedules, v-prediction; rectified flow), whose probability-flow ODE has a
closed form, and the table gives the largest distance to the ODE's true end point over 3 × 64 values: the
discretisation error of each sampler at each step count, free of training noise (seconds: milliseconds here).
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
from medsynth.diffusion import DDIMSampler, DPMSolverSampler, EulerSampler, HeunSampler, UniPCSampler
from medsynth.diffusion.analytic import ode_error
from medsynth.loading import load_module

DDPM_SAMPLERS = (("DDIM", DDIMSampler), ("DPM-Solver++ 2M", DPMSolverSampler), ("UniPC", UniPCSampler))
FLOW_SAMPLERS = (("Euler", EulerSampler), ("Heun", HeunSampler), ("DPM-Solver++ 2M (flow)", DPMSolverSampler),
                 ("UniPC (flow)", UniPCSampler))


def run(module, sampler, masks, repeats: int) -> tuple[float, int, list]:
    """Median seconds per image over ``repeats``, net evaluations per image, and the samples."""
    times, out, calls = [], None, []
    net = module.net
    forward = net.forward
    net.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # counts evaluations (one per batch)
    try:
        for _ in range(repeats):
            calls.clear()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module.sample(masks, sampler=sampler)
            times.append((time.perf_counter() - t0) / masks.shape[0])
    finally:
        del net.forward
    return statistics.median(times), len(calls), [x[0].float().numpy() for x in out]


def analytic(steps: list[int], out: Path) -> None:
    """Print and save the discretisation error of every sampler at every step count (see the module docstring)."""
    from medsynth.diffusion import DDPMObjective, RectifiedFlowObjective

    objectives = [("DDPM linear (v)", DDPMObjective("v_prediction")),
                  ("DDPM cosine (v)", DDPMObjective("v_prediction", beta_schedule="squaredcos_cap_v2")),
                  ("rectified flow", RectifiedFlowObjective())]
    rows = []
    for objective_name, objective in objectives:
        samplers = DDPM_SAMPLERS if objective.family == "diffusion" else FLOW_SAMPLERS
        for name, cls in samplers:
            errors = {}
            for n in steps:
                kwargs = {"clip_sample": False} if "clip_sample" in cls.__init__.__code__.co_varnames else {}
                errors[n] = round(ode_error(cls(n, progress=False, **kwargs), objective), 4)
            rows.append({"objective": objective_name, "sampler": name, "max_error": errors})
    print(f"{'objective':16s} {'sampler':24s} " + " ".join(f"{n:>7d}" for n in steps) + "   (steps)")
    for r in rows:
        print(f"{r['objective']:16s} {r['sampler']:24s} " + " ".join(f"{r['max_error'][n]:>7.4f}" for n in steps))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "data": "N(0.3, 0.5^2), exact denoiser"}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddim-ckpt", type=Path, help="a DDPM-objective demo model")
    p.add_argument("--rf-ckpt", type=Path, help="a rectified-flow demo model")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--segmenter", type=Path, help="a SegmenterModule checkpoint: also report its Dice (the judge)")
    p.add_argument("--img-dir", type=Path, help="another dataset than the demo (reference layout): its test split")
    p.add_argument("--seg-dir", type=Path, help="its masks (SEG_DIR/all/test)")
    p.add_argument("--num-classes", type=int, default=3, help="its classes, background counted")
    p.add_argument("--image-size", type=int, default=64, help="its image side (as the models were trained)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--analytic", action="store_true", help="the exact-ODE error table instead (no models needed)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/sampler_speed[_analytic].json)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.analytic:
        return analytic(args.steps, Path(args.out or "benchmarks/results/sampler_speed_analytic.json"))
    if args.ddim_ckpt is None and args.rf_ckpt is None:
        p.error("give --ddim-ckpt and/or --rf-ckpt (or --analytic)")
    args.out = args.out or "benchmarks/results/sampler_speed.json"

    if args.img_dir:  # the intensity segmenter fits the demo's three classes only: the judge alone scores
        from medsynth.data import SegGuidedImageDataModule

        dm = SegGuidedImageDataModule(args.img_dir, args.seg_dir, num_classes=args.num_classes,
                                      image_size=args.image_size, num_workers=0, random_flip=False)
        dm.setup("test")
        lo = hi = None
    else:
        dm = MNI152SliceDataModule(image_size=args.image_size, num_workers=0, random_flip=False)
        dm.setup("fit")
        dm.setup("test")
        lo, hi = fit_thresholds(*split_arrays(dm.datasets["train"])[:2])
    te_img, te_mask, _ = split_arrays(dm.datasets["test"])

    def intensity_dice(images) -> float:
        return round(mean_dice(images, te_mask, lo, hi), 3) if lo is not None else float("nan")
    masks = torch.from_numpy(np.stack(te_mask))

    settings = []
    if args.ddim_ckpt:
        ddpm_model = load_module(args.ddim_ckpt)
        settings += [(name, "DDPM (v)", n, ddpm_model, cls(n, progress=False)) for name, cls in DDPM_SAMPLERS
                     for n in args.steps]
    if args.rf_ckpt:
        rf_model = load_module(args.rf_ckpt)
        settings += [(name, "rectified flow", n, rf_model, cls(n, progress=False)) for name, cls in FLOW_SAMPLERS
                      for n in args.steps]
    judge = load_module(args.segmenter) if args.segmenter else None

    def judged(images) -> float:
        if judge is None:
            return float("nan")
        x = torch.from_numpy(np.stack(images))[:, None]
        return round(float(torch.nanmean(judge.per_class_dice(judge(x), masks))), 3)

    for model in {id(m): m for _, _, _, m, _ in settings}.values():  # warm-up: the first timing pays no start-up
        run(model, model.sampler.with_settings(num_inference_steps=1, progress=False), masks[:1], 1)
    rows = []
    for name, model_name, steps, model, sampler in settings:
        sec, nfe, samples = run(model, sampler, masks, args.repeats)
        rows.append({"sampler": name, "model": model_name, "steps": steps, "nfe": nfe, "s_per_image": round(sec, 4),
                     "dice": intensity_dice(samples), "segmenter_dice": judged(samples)})
        print(rows[-1], flush=True)
    # the reference: DDIM-50 on the DDPM model, else Euler at the most steps on the flow model
    ref = next((r for r in rows if r["sampler"] == "DDIM" and r["steps"] == 50), None) or next(
        (r for r in rows if r["sampler"] == "Euler" and r["steps"] == max(args.steps)), None)
    ref_name = f"{ref['sampler']}-{ref['steps']}" if ref else "-"
    for r in rows:
        r["delta_ref"] = round(r["dice"] - ref["dice"], 3) if ref else None
        r["segmenter_delta_ref"] = round(r["segmenter_dice"] - ref["segmenter_dice"], 3) if ref and judge else None
    rows.append({"sampler": "real test slices", "model": "-", "steps": 0, "nfe": 0, "s_per_image": 0.0,
                 "dice": intensity_dice(te_img), "segmenter_dice": judged(te_img),
                 "delta_ref": None, "segmenter_delta_ref": None})
    print(f"{'sampler':24s} {'model':15s} {'steps':>5s} {'NFE':>4s} {'s/image':>8s} {'Dice':>6s} {'Δ ' + ref_name:>10s} "
          f"{'seg. Dice':>9s} {'seg. Δ':>7s}")
    for r in rows:
        delta = "" if r["delta_ref"] is None or r["delta_ref"] != r["delta_ref"] else f"{r['delta_ref']:+.3f}"
        sdelta = "" if r["segmenter_delta_ref"] is None else f"{r['segmenter_delta_ref']:+.3f}"
        print(f"{r['sampler']:24s} {r['model']:15s} {r['steps']:>5d} {r['nfe']:>4d} {r['s_per_image']:>8.3f} "
              f"{r['dice']:>6.3f} {delta:>10s} {r['segmenter_dice']:>9} {sdelta:>7s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "batch": int(masks.shape[0]), "precision": "bf16 autocast, CPU",
                               "repeats": args.repeats, "reference": ref_name, "ddim_ckpt": str(args.ddim_ckpt),
                               "rf_ckpt": str(args.rf_ckpt)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
