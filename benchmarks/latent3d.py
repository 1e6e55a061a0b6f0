"""3D latent diffusion: training throughput (medsynth fit against a plain loop) and generation time and peak
memory against output size.

Training: BiFlowNet (``configs/biflownet3d.yaml`` net, or ``--tiny``) on random 8-channel latents, ``--crop``
latent voxels per side, batch ``--batch-size``; the same net, objective, AdamW, clipping and autocast in a plain
PyTorch loop; medians of steps after warm-up. Generation: for each output side N (a volume of N^3 voxels), a
DDIM sample of the latent (N/4)^3 with the BiFlowNet and its decoding by the PatchVolume autoencoder of
``configs/ae3d.yaml`` in overlapping tiles, each size in its own process (peak RSS, or peak GPU memory).
Untrained weights: time and memory do not depend on them. Prints tables, writes JSON.

    python benchmarks/latent3d.py                                     # CPU: training + 64/128/256
    python benchmarks/latent3d.py --device cuda --sizes 128 256 512   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

NET = dict(channels=(64, 128, 256), dit_patch=8, dit_hidden=256, dit_depth=2, dit_heads=4)
TINY = dict(channels=(16, 32), norm_num_groups=8, dit_patch=8, dit_hidden=32, dit_depth=1, dit_heads=2)


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)  # kB
    return float("nan")


def net_factory(tiny: bool):
    from medsynth.nets import BiFlowNet3D

    return partial(BiFlowNet3D, **(TINY if tiny else NET))


def write_latents(folder: Path, n: int, side: int) -> Path:
    import numpy as np

    (folder / "latents").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        np.save(folder / "latents" / f"v{i}.npy", rng.normal(size=(8, side, side, side)).astype(np.float32))
        records.append({"latent": f"latents/v{i}.npy", "name": f"v{i}", "shape": [8, side, side, side],
                        "split": "train" if i else "val"})
    from medsynth.data.latent_manifest import latent_manifest
    from medsynth.io import save_json

    # standard-normal latents: the identity scaling; no autoencoder file (nothing is decoded here)
    scaling = {"method": "std", "shift": 0.0, "scale": 1.0, "min": -5.0, "max": 5.0}
    return save_json(folder / "latents.json",
                     latent_manifest(records, scaling, {"latent_channels": 8, "downsample_factor": 4}))


def training(args) -> dict:
    import lightning as L
    import torch

    from medsynth.data import LatentDataModule
    from medsynth.modules import DiffusionModule

    steps, warm = args.steps, args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_latents(Path(tmp), 9, args.crop)
        dm = LatentDataModule(manifest=manifest, batch_size=args.batch_size, num_workers=0)

        class Stamps(L.Callback):
            def __init__(self) -> None:
                self.t: list[float] = []

            def on_train_batch_end(self, trainer, *a) -> None:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                self.t.append(time.perf_counter())

        def lightning_rate() -> float:
            torch.manual_seed(0)
            module = DiffusionModule(net=net_factory(args.tiny), image_channels=8, sample_shape=[args.crop] * 3,
                                     lr_warmup_steps=10)
            stamps = Stamps()
            trainer = L.Trainer(max_steps=warm + steps, accelerator=args.device, devices=1, precision=args.precision,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                                callbacks=[stamps])
            trainer.fit(module, datamodule=dm)
            gaps = [b - a for a, b in zip(stamps.t[warm:], stamps.t[warm + 1:])]
            return args.batch_size / statistics.median(gaps)

        def plain_rate() -> float:
            torch.manual_seed(0)
            module = DiffusionModule(net=net_factory(args.tiny), image_channels=8, sample_shape=[args.crop] * 3)
            module.to(args.device).train()
            opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
            dm.setup("fit")
            loader = dm.train_dataloader()
            dtype = torch.bfloat16 if "bf16" in args.precision else torch.float32
            t, it = [], iter(loader)
            for _ in range(warm + steps + 1):
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    batch = next(it)
                batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with torch.autocast(args.device, dtype=dtype, enabled="bf16" in args.precision):
                    loss = module.diffusion_loss(batch)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.net.parameters(), 1.0)
                opt.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t.append(time.perf_counter())
            gaps = [b - a for a, b in zip(t[warm:], t[warm + 1:])]
            return args.batch_size / statistics.median(gaps)

        fit, plain = [], []
        for _ in range(args.repeats):
            fit.append(lightning_rate())
            plain.append(plain_rate())
    f, p = statistics.median(fit), statistics.median(plain)
    return {"latent_crop": args.crop, "batch_size": args.batch_size, "fit_latents_per_s": round(f, 3),
            "plain_latents_per_s": round(p, 3), "ratio": round(f / p, 3)}


def generation(side: int, args) -> dict:
    import torch

    from medsynth.diffusion import DDIMSampler
    from medsynth.modules import AutoencoderModule, DiffusionModule
    from medsynth.nets import PatchVolumeAutoencoder
    from medsynth.nets.tiling import decode_tiled

    torch.manual_seed(0)
    dev = args.device
    ae = AutoencoderModule(net=PatchVolumeAutoencoder(channels=(32, 64, 128), latent_channels=8, norm_num_groups=16),
                           image_size=64).eval().to(dev)
    f = ae.net.downsample_factor
    latent = side // f
    module = DiffusionModule(net=net_factory(args.tiny), image_channels=8, sample_shape=[latent] * 3,
                             sampler=DDIMSampler(args.ddim_steps)).eval().to(dev)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=dtype == torch.bfloat16):
        z = module.sample(indices=[0])
        t1 = time.perf_counter()
        x = decode_tiled(ae.net.decode, z.float(), 32, f, overlap=0.25)
    if dev == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    assert x.shape[2:] == (side,) * 3
    row = {"side": side, "latent": latent, "sample_s": round(t1 - t0, 2), "decode_s": round(t2 - t1, 2),
           "peak_rss_gib": peak_rss_gib()}
    if dev == "cuda":
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--tiny", action="store_true", help="a small BiFlowNet instead of the recipe's")
    p.add_argument("--crop", type=int, default=16, help="training latent crop side")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--out", default="benchmarks/results/latent3d.json")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(generation(args.one, args)))
        return
    result = {"benchmark": "latent3d", "device": args.device, "precision": args.precision,
              "net": "tiny" if args.tiny else "recipe", "ddim_steps": args.ddim_steps,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    if not args.skip_training:
        result["training"] = training(args)
        t = result["training"]
        print(f"| latent crop | batch | medsynth fit (latents/s) | plain loop (latents/s) | ratio |\n| --- | --- | --- | --- | --- |\n"
              f"| {t['latent_crop']}^3 | {t['batch_size']} | {t['fit_latents_per_s']} | {t['plain_latents_per_s']} | {t['ratio']} |\n")
    rows = []
    for side in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(side), "--device", args.device, "--precision", args.precision,
               "--ddim-steps", str(args.ddim_steps)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                    {"side": side, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
        print(rows[-1], flush=True)
    result["generation"] = rows
    gpu = args.device == "cuda"
    print(f"\n| output | latent | sampling (s, DDIM-{args.ddim_steps}) | decoding (s) | peak RSS (GiB) |"
          + (" peak GPU (GiB) |" if gpu else "") + "\n| --- | --- | --- | --- | --- |" + (" --- |" if gpu else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['side']}^3 | error: {r['error']} |")
        else:
            print(f"| {r['side']}^3 | {r['latent']}^3 | {r['sample_s']} | {r['decode_s']} | {r['peak_rss_gib']} |"
                  + (f" {r.get('peak_gpu_gib')} |" if gpu else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
