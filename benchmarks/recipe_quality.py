"""How faithful a recipe's samples are, against training steps, on datasets that are not the demo.

For each dataset (built by ``benchmarks/datasets.py`` from files pip packages ship) and each recipe variant, it
trains the recipe through the real ``medsynth fit`` with checkpoints at the given step budgets, samples each with
``medsynth predict``, and scores the samples with the project's own judges through ``medsynth test``: a segmenter
(mask-guided recipes: mean foreground Dice) or a classifier (class-conditional recipes: accuracy), each trained on
the dataset's real training images. Every score is divided by the judge's score on the real test images (the
ceiling). Mask generators (variants with ``mask2d.yaml``) are judged by ``medsynth.metrics.masks``: each sample's
Dice with its nearest real training mask, over the same number for the real test masks; rows add coverage and
copies. Prints a table and writes JSON.

    python benchmarks/recipe_quality.py --datasets coronal4 sagittal4_t2 --variants quick --steps 500 1000 2000
    python benchmarks/recipe_quality.py --datasets planes3_t2 --variants class_quick --steps 1000 2000
    python benchmarks/recipe_quality.py --datasets sagittal4_t2 --variants mask_quick --steps 500 1000 2000

Variants (``VARIANTS`` below) are config lists plus flags; add your own with ``--extra NAME=FLAGS``. Checkpoints
are taken along one run (a point at step N of a longer cosine schedule has not yet decayed its learning rate, so
early points are slightly pessimistic against a run stopped there). Wall times are this machine's and include
validation and previews; timing is measured by ``time.perf_counter`` around each command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import CLASS_DATASETS, SEG_DATASETS, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MEDSYNTH = [sys.executable, "-m", "medsynth"]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

VARIANTS: dict[str, dict] = {
    # the recipe as a user runs it first: seg2d + quick
    "quick": {"configs": ["seg2d.yaml", "experiments/quick.yaml"], "flags": []},
    # the recipe alone (its own budget cut by --steps)
    "seg2d": {"configs": ["seg2d.yaml"], "flags": []},
    # the reference paper's training settings on the recipe's net: epsilon, fp32, no EMA, k/255 masks
    "reference": {"configs": ["seg2d.yaml", "experiments/reference_training.yaml"], "flags": []},
    "mask_quick": {"configs": ["mask2d.yaml", "experiments/quick.yaml"], "flags": []},
    "class_quick": {"configs": ["class2d.yaml", "experiments/quick.yaml"], "flags": []},
    "class2d": {"configs": ["class2d.yaml"], "flags": []},
}


def run(cmd: list, log: Path) -> float:
    """Run a medsynth command, its output to ``log``; return seconds; raise with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
    if proc.returncode:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - t0


def data_flags(name: str, root: Path, info: dict, image_size: int) -> list:
    if info["kind"] == "seg":
        return ["--data.img_dir", root / "images", "--data.seg_dir", root / "masks",
                "--data.num_classes", info["num_classes"], "--data.image_size", image_size]
    return ["--data.manifest", root / "classmap.json", "--data.image_size", image_size]


def judge(name: str, root: Path, info: dict, work: Path, image_size: int, steps: int) -> tuple[Path, list, float]:
    """Train (once) the dataset's judge on its real images and score the real test split: (checkpoint, config
    flags, ceiling)."""
    seg = info["kind"] == "seg"
    cfg = ["--config", CONFIGS / ("segmenter2d.yaml" if seg else "classifier2d.yaml")]
    flags = [*cfg, *data_flags(name, root, info, image_size), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false"]
    run_dir = work / "judges" / f"{name}_{image_size}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    log = run_dir.parent / f"{name}_{image_size}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.is_file():
        run(MEDSYNTH + ["fit", *flags, "--trainer.max_steps", steps, "--trainer.default_root_dir", run_dir], log)
    real = run_dir / "scores" / "real_test.json"
    if not real.is_file():
        run(MEDSYNTH + ["test", *flags, "--ckpt_path", ckpt, "--trainer.default_root_dir", run_dir], log)
    key = "test/dice" if seg else "test/accuracy"
    return ckpt, flags, float(json.loads(real.read_text())["scores"][key])


def score_samples(judge_flags: list, judge_ckpt: Path, samples: Path, root: Path, log: Path) -> dict:
    """The judge's scores on a ``medsynth predict`` folder, through ``medsynth test`` with
    ``SampleDirDataModule`` (replacing earlier ones); ``root``: the judging run's folder."""
    run(MEDSYNTH + ["test", *judge_flags, "--ckpt_path", judge_ckpt, "--data", "medsynth.data.SampleDirDataModule",
                    "--data.samples_dir", samples, "--data.overwrite", "true", "--trainer.default_root_dir", root], log)
    return json.loads((samples / "scores.json").read_text())["scores"]


def class_similarity(samples: Path, root: Path, image_size: int) -> dict:
    """How alike a class-conditional model's samples are within each class, against the real test images: the
    mean pairwise SSIM of each class's samples and of its real test images (``mean_pairwise_similarity``; lower is
    more diverse), averaged over classes. A ratio above 1 means the samples vary less than real images of their
    class do (what strong guidance trades for faithfulness)."""
    from medsynth.data import ClassImageDataModule
    from medsynth.data.image2d import read_image, to_unit_range
    from medsynth.metrics.distribution import mean_pairwise_similarity

    dm = ClassImageDataModule(manifest=root / "classmap.json", image_size=image_size, num_workers=0)
    real = dm.dataset("test")
    by_class: dict[int, list] = {}
    for i in range(len(real)):
        item = real[i]
        by_class.setdefault(int(item["label"]), []).append(item["image"])
    fake_sims, real_sims = [], []
    for k, name in enumerate(dm.class_names):
        files = sorted((samples / name).glob("sample_*.png"))
        if len(files) < 2 or len(by_class.get(k, [])) < 2:
            continue
        fake = torch.stack([torch.from_numpy(to_unit_range(read_image(f, 1))) for f in files])
        fake_sims.append(mean_pairwise_similarity(fake))
        real_sims.append(mean_pairwise_similarity(torch.stack(by_class[k])))
    if not fake_sims:
        return {}
    fake_mean, real_mean = sum(fake_sims) / len(fake_sims), sum(real_sims) / len(real_sims)
    return {"similarity": round(fake_mean, 4), "similarity_real": round(real_mean, 4),
            "similarity_ratio": round(fake_mean / real_mean, 3)}


def mask_judge(root: Path, info: dict, image_size: int) -> tuple[None, list, float]:
    """The judge of mask generators (``medsynth.metrics.masks``): no checkpoint, its flags, and the ceiling (the
    real test masks' fidelity to the training masks)."""
    from medsynth.metrics.masks import mask_scores, read_masks

    flags = ["--train", root / "masks" / "all" / "train", "--test", root / "masks" / "all" / "test",
             "--num-classes", info["num_classes"], "--image-size", image_size]
    train, test = (read_masks(root / "masks" / "all" / s, info["num_classes"], image_size) for s in ("train", "test"))
    return None, flags, mask_scores(test, train, test, info["num_classes"])["fidelity_ceiling"]


def fit_and_score(ds: str, vname: str, base: list, budgets: list[int], runs: Path, judged: tuple,
                  image_size: int, judge_root: Path, no_fit: bool = False, class_root: Path | None = None):
    """Train variant ``vname`` (``base``: its config and data flags) once up to the largest budget with a
    checkpoint at each, then sample each budget with ``medsynth predict`` and score it with the judge
    (``judged``: checkpoint, config flags, score key, ceiling); yields one result row per budget. For a
    class-conditional dataset (``class_root``: its folder) rows add the samples' within-class similarity."""
    judge_ckpt, judge_flags, key, ceiling = judged
    run_dir = runs / f"{vname}_{ds}_{image_size}"
    log = runs / f"{vname}_{ds}_{image_size}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    every = math.gcd(*budgets)  # a checkpoint at every budget
    fit_s = float("nan") if no_fit else run(MEDSYNTH + [
        "fit", *base, "--trainer.max_steps", budgets[-1], "--trainer.default_root_dir", run_dir,
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=medsynth.callbacks.RunCheckpoint",
        "--trainer.callbacks.every_n_train_steps", every, "--trainer.callbacks.save_top_k", -1,
        "--trainer.callbacks.filename", "budget-{step:07d}"], log)
    for steps in budgets:
        ckpt = run_dir / "checkpoints" / f"budget-step={steps:07d}.ckpt"
        if not ckpt.is_file():  # a max_time in the recipe stopped the run before this budget
            ckpt = run_dir / "checkpoints" / "last.ckpt"
        out = run_dir / f"samples_{steps}"
        pred_s = run(MEDSYNTH + ["predict", *base, "--ckpt_path", ckpt, "--output_dir", out, "--overwrite",
                                 "--trainer.enable_progress_bar", "false"], log)
        extra = {}
        if judge_ckpt is None:  # a mask generator: its samples against the real masks (medsynth.metrics.masks)
            run([sys.executable, "-m", "medsynth.metrics.masks", out / "masks", *judge_flags, "--overwrite"], log)
            scores = json.loads((out / "mask_scores.json").read_text())["scores"]
            score = scores[key]
            extra = {k: round(scores[k], 4) for k in ("coverage_fraction", "copies", "area_distance",
                                                      "area_distance_real")}
        else:
            score = score_samples(judge_flags, judge_ckpt, out, judge_root, log)[key]
            if class_root is not None:
                extra = class_similarity(out, class_root, image_size)
        reached = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        print(f"[{ds}] {vname:24s} steps {steps:6d} ({reached}) score {score:.3f} fraction "
              f"{score / ceiling:.3f}  fit {fit_s:5.0f}s predict {pred_s:4.0f}s"
              + (f"  similarity {extra['similarity_ratio']:.2f} of real" if "similarity_ratio" in extra else ""),
              flush=True)
        yield {"dataset": ds, "variant": vname, "flags": shlex.join(map(str, base)), "steps": steps,
               "steps_reached": reached, "image_size": image_size, "score": round(score, 4),
               "ceiling": round(ceiling, 4), "fraction": round(score / ceiling, 3),
               "fit_seconds_total": None if no_fit else round(fit_s), "predict_seconds": round(pred_s), **extra}


def merge_row(results: list[dict], row: dict) -> list[dict]:
    """``results`` with ``row`` replacing an earlier row of the same dataset, variant, budget and image size."""
    same = ("dataset", "variant", "steps", "image_size")
    return [r for r in results if tuple(r[k] for k in same) != tuple(row[k] for k in same)] + [row]


def print_table(results: list[dict]) -> None:
    print(f"\n{'dataset':14s} {'variant':24s} {'steps':>6s} {'fraction':>8s} {'score':>6s} {'ceiling':>7s} {'fit s':>6s}")
    for r in sorted(results, key=lambda r: (r["dataset"], r["variant"], r["steps"])):
        print(f"{r['dataset']:14s} {r['variant']:24s} {r['steps']:6d} {r['fraction']:8.3f} {r['score']:6.3f} "
              f"{r['ceiling']:7.3f} {r['fit_seconds_total'] or 0:6d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["coronal4", "sagittal4_t2"],
                   choices=[*SEG_DATASETS, *CLASS_DATASETS])
    p.add_argument("--variants", nargs="*", default=["quick"], help="none: train and score the judges only")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=FLAGS",
                   help="more variants: a name and the flags added after the base configs, e.g. "
                        "'lr1e-3=--config configs/seg2d.yaml --config configs/experiments/quick.yaml --model.lr 1e-3'")
    p.add_argument("--flags", default="", help="flags added to every variant, e.g. '--trainer.max_time null' to "
                   "measure by steps on a busy machine")
    p.add_argument("--no-fit", action="store_true",
                   help="score the budget checkpoints an earlier (possibly stopped) run of the same variant left")
    p.add_argument("--steps", nargs="+", type=int, default=[500, 1000, 2000], help="budgets (optimiser steps)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--judge-steps", type=int, default=1500)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "recipe_quality")
    p.add_argument("--data-root", type=Path, default=None, help="where datasets are built (default WORK/data)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per command (OMP_NUM_THREADS); 1 avoids thread thrashing on a busy machine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recipe_quality.json")
    args = p.parse_args()

    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    variants = {k: VARIANTS[k] for k in args.variants}
    for spec in args.extra:
        name, flags = spec.split("=", 1)
        variants[name] = {"configs": [], "flags": shlex.split(flags)}
    data_root = args.data_root or args.work / "data"
    budgets = sorted(args.steps)
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for ds in args.datasets:
        root = data_root / ds
        info = build(ds, root)
        masks = {n for n, v in variants.items() if any("mask2d" in str(a) for a in [*v["configs"], *v["flags"]])}
        if masks and info["kind"] != "seg":
            raise SystemExit(f"{ds}: the mask generators {sorted(masks)} need a dataset with masks")
        if len(masks) < len(variants):
            judged = judge(ds, root, info, args.work, args.image_size, args.judge_steps)
            print(f"[{ds}] judge ceiling {judged[2]:.3f} ({'Dice' if info['kind'] == 'seg' else 'accuracy'})",
                  flush=True)
        if masks:
            mask_judged = mask_judge(root, info, args.image_size)
            print(f"[{ds}] mask judge: real test masks' fidelity {mask_judged[2]:.3f}", flush=True)
        for vname, v in variants.items():
            judge_ckpt, judge_flags, ceiling = mask_judged if vname in masks else judged
            key = "fidelity" if vname in masks else "test/dice" if info["kind"] == "seg" else "test/accuracy"
            cfg = [a for c in v["configs"] for a in ("--config", CONFIGS / c)]
            base = [*cfg, *v["flags"], *shlex.split(args.flags), *data_flags(ds, root, info, args.image_size)]
            for row in fit_and_score(ds, vname, base, budgets, args.work / "runs", (judge_ckpt, judge_flags, key, ceiling),
                                     args.image_size, args.work / "judges", args.no_fit,
                                     root if info["kind"] == "class" else None):
                results = merge_row(results, row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
