"""How faithful 2D latent diffusion (configs/ldm2d.yaml) is on datasets that are not the demo: the whole chain.

For each mask-guided dataset of ``benchmarks/datasets.py``: a KL-VAE (``configs/vae2d.yaml``) trained on its real
training images, every image encoded (``configs/encode2d.yaml``), then each variant of ``configs/ldm2d.yaml``
trained on the latents with a checkpoint at each step budget, sampled and decoded by ``medsynth predict``, and
scored through ``medsynth test`` by the dataset's judge of ``recipe_quality.py`` (a segmenter trained on the real
images; mean foreground Dice against the conditioning masks) as a fraction of its real-image ceiling.

Two more measurements, in this process:

- **Reconstruction ceiling**: the judge's Dice on the real test images encoded and decoded by the VAE, over its Dice
  on the real test images themselves (both pooled over all test images here, so the real-image Dice differs from
  ``medsynth test``'s batch-averaged ceiling in the third decimal). A latent model cannot beat its VAE.
- **Samplers** (``--samplers VARIANT``): that variant's model at the largest budget sampled with each sampler
  family that fits its objective (DDIM / DPM-Solver++ 2M / UniPC for DDPM, Euler / DPM-Solver++ 2M / UniPC on
  flow sigmas for rectified flow) at ``--sampler-steps``: fraction of the in-process real-image Dice and seconds
  per image (fp32 as ``medsynth predict`` samples, all test masks in one batch, VAE decoding included; median
  of ``--repeats``, timed by ``sampler_speed.run``).

    python benchmarks/ldm_quality.py --datasets coronal4 --variants epsilon flow --steps 1000 2000 --samplers flow

Variants (``VARIANTS``) are flags after ``configs/ldm2d.yaml``; each names its objective, sampler and learning rate
explicitly so that a row keeps its meaning when the recipe's defaults change (``recipe`` is the config as it is).
Runs go under ``--work`` (judges and data as ``recipe_quality.py`` lays them out there: copy or reuse its folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from medsynth.data import SegGuidedImageDataModule
from medsynth.data.latents import LatentDataModule
from medsynth.loading import load_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import SEG_DATASETS, build  # noqa: E402
from recipe_quality import (  # noqa: E402
    CONFIGS,
    ENV,
    MEDSYNTH,
    ROOT,
    fit_and_score,
    judge,
    merge_row,
    print_table,
    run,
)
from sampler_speed import DDPM_SAMPLERS, FLOW_SAMPLERS  # noqa: E402
from sampler_speed import run as timed  # noqa: E402

EPSILON = ["--model.objective", "medsynth.diffusion.DDPMObjective", "--model.objective.prediction_type", "epsilon",
           "--model.sampler", "medsynth.diffusion.DDIMSampler", "--model.sampler.num_inference_steps", "50"]
FLOW = ["--model.objective", "medsynth.diffusion.RectifiedFlowObjective",
        "--model.sampler", "medsynth.diffusion.EulerSampler", "--model.sampler.num_inference_steps", "50"]
VARIANTS: dict[str, list[str]] = {
    "recipe": [],  # configs/ldm2d.yaml as it is
    # ldm2d's settings before this benchmark: DDPM epsilon, DDIM-50, lr 1e-4 with 500 warm-up steps
    "epsilon": [*EPSILON, "--model.lr", "1e-4", "--model.lr_warmup_steps", "500"],
    # the pixel recipes' (configs/seg2d.yaml): rectified flow, lr 5e-4 with 200 warm-up steps (sampled Euler-50 here)
    "flow": [*FLOW, "--model.lr", "5e-4", "--model.lr_warmup_steps", "200"],
    # one change at a time: the pixel recipes' learning rate with epsilon, and rectified flow at ldm2d's old rate
    "epsilon_lr5e-4": [*EPSILON, "--model.lr", "5e-4", "--model.lr_warmup_steps", "200"],
    "flow_lr1e-4": [*FLOW, "--model.lr", "1e-4", "--model.lr_warmup_steps", "500"],
    # the recipe without EMA, at half its batch and at half its width (docs/benchmarks_ldm2d.md, "EMA, batch and width")
    "recipe_no_ema": ["--config", str(ROOT / "benchmarks" / "configs" / "ldm2d_no_ema.yaml")],
    "recipe_batch8": ["--data.batch_size", "8"],
    "recipe_half_width": ["--model.net.init_args.block_out_channels", "[32, 64, 128]"],
}
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.num_workers", 0]


def vae_and_latents(ds: str, root: Path, info: dict, work: Path, image_size: int, steps: int,
                    vae_flags: list) -> tuple[Path, Path]:
    """Train (once) the dataset's KL-VAE on its real images and encode every split (once): (VAE checkpoint, latent
    folder with ``latents.json``)."""
    vae_dir = work / "vae" / f"{ds}_{image_size}"
    latents = work / "latents" / f"{ds}_{image_size}"
    log = work / "vae" / f"{ds}_{image_size}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    ckpt = vae_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        # validation (PSNR/SSIM, a picture, the best checkpoint) by steps: on a few dozen images an epoch is a
        # handful of steps
        seconds = run(MEDSYNTH + ["fit", "--config", CONFIGS / "vae2d.yaml", "--data.img_dir", root / "images",
                                  "--data.image_size", image_size, "--trainer.max_steps", steps,
                                  "--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", 500,
                                  "--trainer.default_root_dir", vae_dir, *QUIET, *vae_flags], log)
        print(f"[{ds}] VAE {steps} steps: {seconds:.0f}s", flush=True)
    if not (latents / "latents.json").is_file():
        run(MEDSYNTH + ["predict", "--config", CONFIGS / "encode2d.yaml", "--ckpt_path", ckpt,
                        "--data.img_dir", root / "images", "--data.seg_dir", root / "masks",
                        "--data.num_classes", info["num_classes"], "--data.num_workers", 0, "--output_dir", latents], log)
    return ckpt, latents


def judge_dice(segmenter, images: torch.Tensor, masks: torch.Tensor) -> float:
    """The judge's mean foreground Dice of ``images`` ``(B, 1, S, S)`` against ``masks`` ``(B, S, S)``, pooled."""
    with torch.no_grad():
        return float(torch.nanmean(segmenter.per_class_dice(segmenter(images), masks)))


def real_test_split(root: Path, info: dict, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real test images ``(B, 1, S, S)`` in [-1, 1] and masks ``(B, S, S)``, as the judge was trained to see them."""
    dm = SegGuidedImageDataModule(root / "images", root / "masks", num_classes=info["num_classes"],
                                  image_size=image_size, num_workers=0, random_flip=False)
    dm.setup("test")
    items = [dm.datasets["test"][i] for i in range(len(dm.datasets["test"]))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]).long()


def reconstruction_ceiling(vae_ckpt: Path, judge_ckpt: Path, root: Path, info: dict, image_size: int) -> dict:
    """The judge's Dice on the real test images and on their VAE reconstructions (see the module docstring)."""
    images, masks = real_test_split(root, info, image_size)
    segmenter, vae = load_module(judge_ckpt), load_module(vae_ckpt)
    recon = vae.reconstruct(images).clamp(-1, 1)
    real, decoded = judge_dice(segmenter, images, masks), judge_dice(segmenter, recon, masks)
    return {"real_dice": round(real, 4), "reconstruction_dice": round(decoded, 4),
            "fraction": round(decoded / real, 3), "l1": round(float((recon - images).abs().mean()), 4),
            "test_images": int(images.shape[0])}


class _Decoded:
    """A latent model as ``sampler_speed.run`` times one: ``sample`` returns decoded images, in fp32 as
    ``medsynth predict`` samples (the bf16 autocast ``run`` opens is switched off inside)."""

    def __init__(self, ldm) -> None:
        self.ldm, self.net = ldm, ldm.net

    def sample(self, masks: torch.Tensor, sampler) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.ldm.decode(self.ldm.sample(masks, sampler=sampler))


def sampler_sweep(ldm_ckpt: Path, latents: Path, judge_ckpt: Path, num_classes: int, real_dice: float,
                  steps: list[int], repeats: int) -> list[dict]:
    """Every sampler that fits the model's objective at every step count: fraction of ``real_dice`` and seconds per
    image (see the module docstring)."""
    ldm, segmenter = load_module(ldm_ckpt), load_module(judge_ckpt)
    dm = LatentDataModule(manifest=latents / "latents.json", num_classes=num_classes, num_workers=0)
    dm.setup("test")
    # a model trained before its arguments named its latents' scaling, loaded outside a trainer, would take
    # standardised latents for min-max ones and clip them to [-1, 1], as `medsynth predict` does not
    space = getattr(ldm, "latent_space", None)
    if space is not None:
        space.setdefault("method", dm.info["scaling"]["method"])
    items = [dm.datasets["test"][i] for i in range(len(dm.datasets["test"]))]
    latent_masks = torch.stack([it["mask"] for it in items])
    image_masks = torch.stack([it["image_mask"] for it in items]).long()  # as encoded: the image's size
    flow = ldm.objective.family == "flow"
    families = [(n, c) for n, c in (FLOW_SAMPLERS if flow else DDPM_SAMPLERS) if n != "Heun"]
    model = _Decoded(ldm)
    torch.set_grad_enabled(False)
    timed(model, ldm.sampler.with_settings(num_inference_steps=1, progress=False), latent_masks[:1], 1)  # warm-up
    rows = []
    for name, cls in families:
        for n in steps:
            sec, nfe, images = timed(model, cls(n, progress=False), latent_masks, repeats)  # decoded: 1 channel
            dice = judge_dice(segmenter, torch.from_numpy(np.stack(images))[:, None], image_masks)
            rows.append({"sampler": name, "objective": type(ldm.objective).__name__, "steps": n, "nfe": nfe,
                         "s_per_image": round(sec, 4), "dice": round(dice, 4), "fraction": round(dice / real_dice, 3)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["coronal4"], choices=SEG_DATASETS)
    p.add_argument("--variants", nargs="*", default=["recipe"], choices=list(VARIANTS),
                   help="none: VAE, latents and reconstruction ceiling only")
    p.add_argument("--steps", nargs="+", type=int, default=[1000, 2000], help="budgets (optimiser steps)")
    p.add_argument("--flags", default="", help="flags added to every variant")
    p.add_argument("--no-fit", action="store_true", help="score the budget checkpoints an earlier run left")
    p.add_argument("--samplers", metavar="VARIANT", help="sweep the samplers of this variant's largest budget")
    p.add_argument("--sampler-steps", nargs="+", type=int, default=[5, 10, 25, 50])
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per sampler setting (median)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-flags", default="", help="flags added to the VAE's training")
    p.add_argument("--judge-steps", type=int, default=1500)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "ldm_quality",
                   help="runs, and judges/ and data/ as recipe_quality.py lays them out (trained there if missing)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (OMP_NUM_THREADS) per command and here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ldm_quality.json")
    args = p.parse_args()

    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    budgets = sorted(args.steps)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {"chain": [], "reconstruction": {}, "samplers": {}, **results}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    for ds in args.datasets:
        root = args.work / "data" / ds
        info = build(ds, root)
        judge_ckpt, judge_flags, ceiling = judge(ds, root, info, args.work, args.image_size, args.judge_steps)
        vae_ckpt, latents = vae_and_latents(ds, root, info, args.work, args.image_size, args.vae_steps,
                                            shlex.split(args.vae_flags))
        recon = {**reconstruction_ceiling(vae_ckpt, judge_ckpt, root, info, args.image_size),
                 "vae_steps": args.vae_steps, "vae_flags": args.vae_flags, "judge_ceiling": round(ceiling, 4)}
        results["reconstruction"][f"{ds}_{args.image_size}"] = recon
        save()
        print(f"[{ds}] judge ceiling {ceiling:.3f}; in process: real {recon['real_dice']:.3f}, VAE reconstructions "
              f"{recon['reconstruction_dice']:.3f} = {recon['fraction']:.3f} of it (L1 {recon['l1']:.3f})", flush=True)
        data = ["--data.manifest", latents / "latents.json", "--data.num_classes", info["num_classes"]]
        for vname in args.variants:
            base = ["--config", CONFIGS / "ldm2d.yaml", *VARIANTS[vname], *shlex.split(args.flags), *data, *QUIET]
            for row in fit_and_score(ds, vname, base, budgets, args.work / "ldm", (judge_ckpt, judge_flags,
                                     "test/dice", ceiling), args.image_size, args.work / "judges", args.no_fit):
                results["chain"] = merge_row(results["chain"], row)
                save()
        if args.samplers:
            run_dir = args.work / "ldm" / f"{args.samplers}_{ds}_{args.image_size}"
            ckpt = run_dir / "checkpoints" / f"budget-step={budgets[-1]:07d}.ckpt"
            rows = sampler_sweep(ckpt, latents, judge_ckpt, info["num_classes"], recon["real_dice"],
                                 args.sampler_steps, args.repeats)
            results["samplers"][f"{args.samplers}_{ds}_{args.image_size}_{budgets[-1]}"] = rows
            save()
    print_table(results["chain"])
    for key, rows in results["samplers"].items():
        print(f"\n{key}\n{'sampler':24s} {'steps':>5s} {'NFE':>4s} {'s/image':>8s} {'Dice':>6s} {'fraction':>8s}")
        for r in rows:
            print(f"{r['sampler']:24s} {r['steps']:5d} {r['nfe']:4d} {r['s_per_image']:8.3f} {r['dice']:6.3f} "
                  f"{r['fraction']:8.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
