"""Compute per training step of the 2D recipes' UNet, counted in floating-point operations: the unit the recipe sweep
compares variants in (``docs/benchmarks.md``, "Net width, batch size and learning rate"), since CPU wall times on
a shared machine vary 2-4x between runs while operation counts do not.

Counts forward and backward of ``medsynth.nets.UNet2D`` with ``torch.utils.flop_counter`` (matrix products and
convolutions; the optimiser and normalisations are not counted) for each named variant and prints a table, its
cost relative to the first, and writes JSON.

    python benchmarks/step_flops.py                      # the seg2d sweep's variants, 4 classes, 32x32
    python benchmarks/step_flops.py --image-size 64 --in-channels 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medsynth.nets import UNet2D

RECIPE = (32, 64, 64, 128)  # configs/seg2d.yaml, class2d.yaml, mask2d.yaml
VARIANTS = {  # name: (block_out_channels, norm_num_groups, batch)
    "recipe (batch 16)": (RECIPE, 32, 16),
    "batch 8": (RECIPE, 32, 8),
    "batch 32": (RECIPE, 32, 32),
    "half width": ((16, 32, 32, 64), 16, 16),
    "double width": ((64, 128, 128, 256), 32, 16),
}


def step_flops(channels: tuple[int, ...], groups: int, batch: int, size: int, in_ch: int, out_ch: int) -> int:
    """Operations of one forward and backward pass of a batch."""
    torch.manual_seed(0)
    net = UNet2D(in_ch, out_ch, block_out_channels=channels, norm_num_groups=groups)
    x, t = torch.randn(batch, in_ch, size, size), torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        net(x, t).square().mean().backward()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=5, help="image + mask channels (1 + 4 one-hot classes)")
    p.add_argument("--out-channels", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_flops.json")
    args = p.parse_args()
    rows, base = [], None
    print(f"{'variant':20s} {'GFLOP/step':>10s} {'relative':>8s} {'parameters':>10s}")
    for name, (channels, groups, batch) in VARIANTS.items():
        flops = step_flops(channels, groups, batch, args.image_size, args.in_channels, args.out_channels)
        params = sum(q.numel() for q in UNet2D(args.in_channels, args.out_channels, block_out_channels=channels,
                                                norm_num_groups=groups).parameters())
        base = base or flops
        rows.append({"variant": name, "block_out_channels": list(channels), "batch": batch,
                     "image_size": args.image_size, "gflop_per_step": round(flops / 1e9, 3),
                     "relative": round(flops / base, 3), "parameters": params})
        print(f"{name:20s} {flops / 1e9:10.2f} {flops / base:8.2f} {params:10d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
