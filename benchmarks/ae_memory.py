"""Peak memory and time of reconstructing whole volumes with the PatchVolume autoencoder, against volume size.

Each size runs in its own process (a clean peak): a random volume of side N is encoded patch by patch and decoded
in overlapping, blended tiles (``AutoencoderModule.reconstruct``). Reported: peak resident memory of the process
(CPU) or peak allocated GPU memory, wall time, and the memory of the volume itself for scale. The net is the
``configs/ae3d.yaml`` one (untrained: memory and time do not depend on the weights). Prints a table, writes JSON.

    python benchmarks/ae_memory.py                        # CPU, 64^3 .. 256^3
    python benchmarks/ae_memory.py --device cuda --sizes 64 128 256 384 512
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)  # kB
    return float("nan")


def measure(size: int, device: str, patch: int, tile: int, channels: list[int], precision: str) -> dict:
    import torch

    from medsynth.modules import AutoencoderModule
    from medsynth.nets import PatchVolumeAutoencoder

    torch.manual_seed(0)
    net = PatchVolumeAutoencoder(spatial_dims=3, in_channels=1, channels=channels, latent_channels=8,
                                 norm_num_groups=16)
    module = AutoencoderModule(net=net, image_size=patch, predict_tile=tile).eval().to(device)
    x = torch.rand(1, 1, size, size, size, device=device) * 2 - 1
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=dtype, enabled=precision == "bf16"):
        out = module.reconstruct(x)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape == x.shape
    row = {"size": size, "seconds": round(seconds, 2), "volume_mib": round(x.numel() * 4 / 2**20, 1)}
    row["peak_rss_gib"] = peak_rss_gib()
    if device == "cuda":
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192, 256])
    p.add_argument("--device", default="cpu")
    p.add_argument("--patch", type=int, default=64, help="patch side for patch-wise encoding (stage-1 patch)")
    p.add_argument("--tile", type=int, default=32, help="latent tile side for decoding")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--out", default="benchmarks/results/ae_memory.json")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.patch, args.tile, args.channels, args.precision)))
        return
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(size), "--device", args.device, "--patch", str(args.patch),
               "--tile", str(args.tile), "--precision", args.precision, "--channels", *map(str, args.channels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"size": size, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    gpu = args.device == "cuda"
    print(f"\n| side | volume (MiB) | time (s) | peak RSS (GiB) |{' peak GPU (GiB) |' if gpu else ''}")
    print(f"| --- | --- | --- | --- |{' --- |' if gpu else ''}")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']}^3 | error: {r['error']} |")
            continue
        print(f"| {r['size']}^3 | {r['volume_mib']} | {r['seconds']} | {r['peak_rss_gib']} |"
              + (f" {r.get('peak_gpu_gib')} |" if gpu else ""))
    result = {"benchmark": "ae_memory", "device": args.device, "machine": platform.processor() or platform.machine(),
              "patch": args.patch, "tile": args.tile, "channels": args.channels, "precision": args.precision,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
