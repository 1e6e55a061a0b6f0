"""Training throughput of ``medsynth fit`` against a plain PyTorch loop, and DDIM sampling speed.

Both training loops use the same UNet, data loader, batch, precision, optimiser, gradient clipping and EMA; they
alternate ``--repeats`` times and the medians are compared (timings on shared CPUs are noisy). Prints a table and
writes JSON.

    python benchmarks/train_throughput.py                      # CPU: the demo recipe at 64x64
    python benchmarks/train_throughput.py --device cuda --image-size 256 --reference --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medsynth.data import MNI152SliceDataModule
from medsynth.modules import DiffusionModule
from medsynth.nets import UNet2D

REFERENCE_NET = dict(block_out_channels=(128, 128, 256, 256, 512, 512),
                     attention_levels=(False, False, False, False, True, False), layers_per_block=2)
DEMO_NET = dict(block_out_channels=(32, 64, 64, 128), attention_levels=(False, False, False, True), layers_per_block=1)


class StepTimer(L.Callback):
    """Wall-clock time of each training step, data loading and callbacks included."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def make_module(args) -> DiffusionModule:
    net = partial(UNet2D, **(REFERENCE_NET if args.reference else DEMO_NET))
    return DiffusionModule(net=net, num_classes=3, image_size=args.image_size, lr_warmup_steps=10)


def make_data(args) -> MNI152SliceDataModule:
    return MNI152SliceDataModule(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers)


def images_per_s(stamps: list[float], warmup: int, batch: int) -> float:
    measured = stamps[warmup:]
    return batch * (len(measured) - 1) / (measured[-1] - measured[0])


def run_lightning(args) -> float:
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[EMAWeightAveraging(decay=0.999), timer],
    )
    trainer.fit(make_module(args), datamodule=make_data(args))
    return images_per_s(timer.stamps, args.warmup, args.batch_size)


def run_plain(args) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device if args.device != "auto" else "cpu")
    module = make_module(args).to(device)  # the same net, objective and conditioning code
    net = module.net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    dm = make_data(args)
    dm.setup("fit")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    stamps, step = [], 0
    while step < args.warmup + args.steps:
        for batch in dm.train_dataloader():
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = module.diffusion_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            ema.update_parameters(net)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            step += 1
            if step >= args.warmup + args.steps:
                break
    return images_per_s(stamps, args.warmup, args.batch_size)


def ddim_seconds_per_image(args) -> float:
    device = torch.device(args.device if args.device != "auto" else "cpu")
    module = make_module(args).to(device).eval()
    mask = torch.randint(0, 3, (args.batch_size, args.image_size, args.image_size), device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            module.sample(mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / args.batch_size)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="the reference paper's net instead of the demo net")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args()

    lightning_runs, plain_runs = [], []
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        lightning_runs.append(run_lightning(args))
        plain_runs.append(run_plain(args))
    fit, plain = statistics.median(lightning_runs), statistics.median(plain_runs)
    ddim = ddim_seconds_per_image(args)
    result = {
        "device": args.device, "torch": torch.__version__, "lightning": L.__version__, "cpu": platform.processor(),
        "threads": torch.get_num_threads(), "precision": args.precision, "image_size": args.image_size,
        "batch_size": args.batch_size, "net": "reference" if args.reference else "demo",
        "params_M": round(sum(p.numel() for p in make_module(args).net.parameters()) / 1e6, 2),
        "medsynth_fit_images_per_s": round(fit, 3), "plain_loop_images_per_s": round(plain, 3),
        "ratio": round(fit / plain, 3), "runs_fit": [round(x, 3) for x in lightning_runs],
        "runs_plain": [round(x, 3) for x in plain_runs], "ddim50_s_per_image": round(ddim, 4),
    }
    print(f"{'measure':32s} {'value':>10s}")
    for k in ("medsynth_fit_images_per_s", "plain_loop_images_per_s", "ratio", "ddim50_s_per_image", "params_M"):
        print(f"{k:32s} {result[k]:>10}")
    print(f"(median of {args.repeats}; {args.precision}, {args.image_size}^2, batch {args.batch_size}, {args.device})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
