"""Training throughput of ``medsynth fit`` against a plain PyTorch loop, and DDIM sampling speed.

Both training loops use the same UNet, data loader, batch, optimiser, gradient clipping and EMA. Each **variant**
names a loop, a precision and speed-ups: ``LOOP-PRECISION[+channels_last][+compile]``, e.g. ``plain-32`` (the
reference's fp32 loop), ``fit-bf16-mixed+channels_last+compile``; a bare ``fit`` or ``plain`` takes
``--precision``. Variants alternate ``--repeats`` times and medians are compared (timings on shared CPUs are
noisy); ``ratio`` is ``fit`` over ``plain`` at ``--precision``. Each row also gives **MFU**: the net's counted
operations per step (forward and backward, ``torch.utils.flop_counter``; the optimiser and normalisations are not
counted) times steps per second, over the device's dense bf16 peak (``--peak-tflops``, or a known GPU's). Prints a
table and writes JSON.

    python benchmarks/train_throughput.py                      # CPU: the demo recipe at 64x64, fit against plain
    python benchmarks/train_throughput.py --device cuda --image-size 256 --reference --speedups   # GPU: #12 item 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

from medsynth.data import MNI152SliceDataModule
from medsynth.modules import DiffusionModule
from medsynth.nets import UNet2D

REFERENCE_NET = dict(block_out_channels=(128, 128, 256, 256, 512, 512),
                     attention_levels=(False, False, False, False, True, False), layers_per_block=2)
DEMO_NET = dict(block_out_channels=(32, 64, 64, 128), attention_levels=(False, False, False, True), layers_per_block=1)
SPEEDUPS = ["plain-32", "fit-32", "plain-bf16-mixed", "fit-bf16-mixed", "fit-bf16-mixed+channels_last",
            "fit-bf16-mixed+channels_last+compile"]
"""``--speedups``: the reference's fp32 loop, then what ``medsynth fit`` adds one at a time."""
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
"""Dense bf16 tensor-core peaks (vendor data sheets, SXM parts unless named), matched against the device name in
this order."""
AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    loop: str  # "fit" (medsynth's Lightning module and Trainer) or "plain" (a hand-written PyTorch loop)
    precision: str
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str, default_precision: str) -> "Variant":
        head, *flags = text.split("+")
        loop, _, precision = head.partition("-")
        precision = precision or default_precision
        if loop not in ("fit", "plain") or precision not in AUTOCAST or set(flags) - {"channels_last", "compile"}:
            raise SystemExit(f"variant {text!r}: expected LOOP-PRECISION[+channels_last][+compile] with LOOP fit or "
                             f"plain and PRECISION one of {', '.join(AUTOCAST)}")
        return cls(loop, precision, "channels_last" in flags, "compile" in flags)

    def __str__(self) -> str:
        return "+".join([f"{self.loop}-{self.precision}"] + [f for f in ("channels_last", "compile") if getattr(self, f)])


class StepTimer(L.Callback):
    """Wall-clock time of each training step, data loading and callbacks included."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def make_module(args, variant: Variant | None = None) -> DiffusionModule:
    net = partial(UNet2D, **(REFERENCE_NET if args.reference else DEMO_NET))
    return DiffusionModule(net=net, num_classes=3, image_size=args.image_size, lr_warmup_steps=10,
                           channels_last=bool(variant and variant.channels_last),
                           compile=bool(variant and variant.compile))


def make_data(args) -> MNI152SliceDataModule:
    return MNI152SliceDataModule(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers)


def images_per_s(stamps: list[float], warmup: int, batch: int) -> float:
    measured = stamps[warmup:]
    return batch * (len(measured) - 1) / (measured[-1] - measured[0])


def device_of(args) -> torch.device:
    return torch.device(args.device if args.device != "auto" else "cpu")


def run_lightning(args, variant: Variant) -> float:
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=variant.precision, max_steps=args.warmup + args.steps,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[EMAWeightAveraging(decay=0.999), timer],
    )
    trainer.fit(make_module(args, variant), datamodule=make_data(args))
    return images_per_s(timer.stamps, args.warmup, args.batch_size)


def run_plain(args, variant: Variant) -> float:
    torch.manual_seed(0)
    device = device_of(args)
    module = make_module(args, variant).to(device)  # the same net, objective and conditioning code
    module.prepare_net()  # channels-last weights and torch.compile, as a hand-written loop would do them
    net = module.net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    dm = make_data(args)
    dm.setup("fit")
    dtype = AUTOCAST[variant.precision]
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


def step_flops(args) -> int:
    """Counted operations of one training step's forward and backward (the net's matrix products, convolutions and
    attention) on one batch of the benchmark's data; they do not depend on precision or memory order."""
    device = device_of(args)
    torch.manual_seed(0)
    module = make_module(args).to(device)
    dm = make_data(args)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        module.diffusion_loss(batch).backward()
    return counter.get_total_flops()


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device_of(args).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def ddim_seconds_per_image(args) -> float:
    device = device_of(args)
    module = make_module(args).to(device).eval()
    mask = torch.randint(0, 3, (args.batch_size, args.image_size, args.image_size), device=device)
    dtype = AUTOCAST.get(args.precision)
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
    p.add_argument("--precision", default="bf16-mixed", choices=list(AUTOCAST),
                   help="precision of bare variants and of DDIM sampling")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="the reference paper's net instead of the demo net")
    p.add_argument("--variants", nargs="+", default=["fit", "plain"],
                   help="LOOP-PRECISION[+channels_last][+compile], e.g. plain-32 fit-bf16-mixed+compile")
    p.add_argument("--speedups", action="store_true", help="variants: " + " ".join(SPEEDUPS))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (known GPUs are looked up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run (torch.compile compiles in them)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-ddim", action="store_true")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args()

    variants = [Variant.parse(v, args.precision) for v in (SPEEDUPS if args.speedups else args.variants)]
    runs: dict[Variant, list[float]] = {v: [] for v in variants}
    memory: dict[Variant, float] = {}
    flops, peak = step_flops(args), peak_tflops(args)
    params = sum(q.numel() for q in make_module(args).net.parameters())
    result: dict = {}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits all alike
        for v in variants:
            if device_of(args).type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            runs[v].append((run_lightning if v.loop == "fit" else run_plain)(args, v))
            if device_of(args).type == "cuda":
                memory[v] = max(memory.get(v, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            # written after every run, so a run stopped by a time cap keeps what it measured
            result = summarise(args, variants, runs, memory, flops, peak, params)
            write(args.out, result)
    if not args.skip_ddim:
        result["ddim50_s_per_image"] = round(ddim_seconds_per_image(args), 4)
    print(f"{'variant':40s} {'img/s':>8s} {'speedup':>8s} {'TFLOP/s':>8s} {'MFU':>7s} {'GiB':>6s}")
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['variant']:40s} {r['images_per_s']:8.2f} {r['speedup']:8.2f} {r['tflops']:8.2f} {mfu:>7s} {mem:>6s}")
    for k in ("ratio", "ddim50_s_per_image", "params_M", "gflop_per_step"):
        if result.get(k) is not None:
            print(f"{k:40s} {result[k]:>8}")
    print(f"(median of {args.repeats}; {args.image_size}^2, batch {args.batch_size}, {args.device}"
          f"{', MFU of ' + str(peak) + ' TFLOP/s bf16' if peak else ', no peak known: MFU needs --peak-tflops'})")
    write(args.out, result)
    print(f"wrote {args.out}")


def summarise(args, variants: list[Variant], runs: dict, memory: dict, flops: int, peak: float | None,
              params: int) -> dict:
    """The result so far: one row per variant measured at least once (medians of its runs)."""
    rows = []
    measured = [v for v in variants if runs[v]]
    for v in measured:
        ips = statistics.median(runs[v])
        achieved = flops * ips / args.batch_size / 1e12  # TFLOP/s
        rows.append({
            "variant": str(v), "images_per_s": round(ips, 3), "runs": [round(x, 3) for x in runs[v]],
            "speedup": round(ips / statistics.median(runs[measured[0]]), 3), "tflops": round(achieved, 2),
            "mfu": round(achieved / peak, 4) if peak else None,
            "peak_memory_gib": round(memory[v], 2) if v in memory else None,
        })
    by_name = {r["variant"]: r["images_per_s"] for r in rows}
    fit, plain = by_name.get(f"fit-{args.precision}"), by_name.get(f"plain-{args.precision}")
    return {
        "device": args.device, "device_name": torch.cuda.get_device_name() if device_of(args).type == "cuda"
        else platform.processor(), "torch": torch.__version__, "lightning": L.__version__,
        "threads": torch.get_num_threads(), "image_size": args.image_size, "batch_size": args.batch_size,
        "net": "reference" if args.reference else "demo",
        "params_M": round(params / 1e6, 2),
        "gflop_per_step": round(flops / 1e9, 2), "peak_bf16_tflops": peak, "warmup": args.warmup,
        "steps": args.steps, "repeats_done": min(len(runs[v]) for v in variants), "rows": rows,
        "ratio": round(fit / plain, 3) if fit and plain else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def write(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
