"""``python -m medsynth.status [RUNS_DIR]``: one line per run folder with its progress, and ``RUN/curves.png``.

The curves (losses and learning rate against the optimiser step) come from the run's own local logs, never the
network: a Lightning ``CSVLogger``'s ``metrics.csv`` anywhere in the run folder when there is one, else the Weights &
Biases run files under ``RUN/wandb/`` (offline or synced alike), read directly, without ``wandb sync``.
"""

from __future__ import annotations

import csv
import json
import math
import struct
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from medsynth.io import save_png

Series = dict[str, list[tuple[float, float]]]
"""Metric name -> ``(step, value)`` points."""

STEP_KEYS = ("trainer/global_step", "step", "_step")
"""Where a logged row keeps its optimiser step, in order of preference (Lightning's W&B key, CSV column, W&B's own)."""


def describe(run: Path) -> str:
    """Step, epoch and best monitored value of a run folder (from its ``last.ckpt``), and its newest preview."""
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return f"{run}: no checkpoint yet"
    ckpt = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    best = None
    for key, state in ckpt.get("callbacks", {}).items():
        if "ModelCheckpoint" in key or "RunCheckpoint" in key:
            if state.get("best_model_score") is not None:
                best = f"{state.get('monitor')}={float(state['best_model_score']):.4f}"
    previews = sorted((run / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
    parts = [f"step {ckpt.get('global_step')}", f"epoch {ckpt.get('epoch')}"]
    if best:
        parts.append(f"best {best}")
    if previews:
        parts.append(f"preview {previews[-1]}")
    return f"{run}: " + ", ".join(parts)


# ----------------------------------------------------------------- reading logs
def _add_row(series: Series, row: dict) -> None:
    step = next((row[k] for k in STEP_KEYS if isinstance(row.get(k), (int, float))), None)
    if step is None:
        return
    for name, value in row.items():
        if name in STEP_KEYS or name == "epoch" or name.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            series.setdefault(name, []).append((float(step), float(value)))


def read_csv_metrics(run: Path) -> Series:
    """Points of every ``metrics.csv`` (Lightning's ``CSVLogger``) in the run folder; resumed runs add files."""
    series: Series = {}
    for path in sorted(run.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                values = {}
                for k, v in row.items():
                    try:
                        values[k] = float(v)
                    except (TypeError, ValueError):
                        pass
                _add_row(series, values)
    return series


def wandb_records(path: Path) -> Iterator[bytes]:
    """The serialised records of a W&B run file (``run-ID.wandb``): a 7-byte header (``:W&B``, magic, version), then
    LevelDB-style log blocks of 32 KiB whose records carry a 7-byte header (CRC-32, length, type: full, first, middle,
    last). A record still being written at the end of the file is left out."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            parts = payload
        elif kind == 3:
            parts += payload
        elif kind == 4:
            yield parts + payload


def read_wandb_metrics(run: Path) -> Series:
    """Points of the W&B history records in ``RUN/wandb/*run-*/run-*.wandb`` (each resumption adds a run file)."""
    from wandb.proto import wandb_internal_pb2

    series: Series = {}
    files = sorted(run.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name.split("-", 1)[-1])
    for path in files:
        for raw in wandb_records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(raw)
            except Exception:  # noqa: BLE001 - a damaged record ends what can be read of this file
                break
            if record.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in record.history.item:
                try:
                    row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
                except ValueError:
                    pass
            _add_row(series, row)
    return series


def read_metrics(run: Path) -> tuple[Series, Optional[str]]:
    """The run's logged metrics and where they came from (``None`` when it has no local logs)."""
    series = read_csv_metrics(run)
    if series:
        return series, "metrics.csv"
    try:
        series = read_wandb_metrics(run)
    except (ImportError, ValueError, OSError):
        series = {}
    return (series, "wandb run files") if series else ({}, None)


# ----------------------------------------------------------------- drawing
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(draw, box, curves: dict[str, list[tuple[float, float]]], title: str, log_y: bool) -> None:
    x0, y0, x1, y1 = box
    left, bottom = x0 + 64, y1 - 22
    draw.rectangle([left, y0 + 18, x1 - 8, bottom], outline=(0, 0, 0))
    draw.text((x0 + 4, y0 + 2), title, fill=(0, 0, 0))
    points = [p for c in curves.values() for p in c]
    if not points:
        draw.text((left + 8, y0 + 30), "nothing logged", fill=(0, 0, 0))
        return
    log_y = log_y and all(v > 0 for _, v in points)
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [s for s, _ in points]
    ys = [f(v) for _, v in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-12 + abs(min(ys)) * 0.1 + 1e-3

    def to_px(s, v):
        return (left + (s - xmin) / (xmax - xmin) * (x1 - 8 - left),
                bottom - (f(v) - ymin) / (ymax - ymin) * (bottom - y0 - 18))

    for label, value in ((f"{10 ** ymax if log_y else ymax:.3g}", ymax), (f"{10 ** ymin if log_y else ymin:.3g}", ymin)):
        draw.text((x0 + 4, (bottom - (value - ymin) / (ymax - ymin) * (bottom - y0 - 18)) - 6), label, fill=(0, 0, 0))
    draw.text((left, bottom + 4), f"step {int(xmin)}", fill=(0, 0, 0))
    draw.text((x1 - 90, bottom + 4), f"step {int(xmax)}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        px = [to_px(s, v) for s, v in pts]
        if len(px) > 1:
            draw.line(px, fill=colour, width=2)
        for x, y in px if len(px) <= 60 else px[-1:]:  # sparse series (validation) as dots
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((left + 8 + 150 * i, y0 + 22), name, fill=colour)


def curves_picture(series: Series, title: str = "", width: int = 720) -> np.ndarray:
    """An RGB uint8 picture of the losses (log scale) and learning rates of ``series`` against the step."""
    from PIL import Image, ImageDraw

    losses = {k: v for k, v in series.items() if "loss" in k.split("/")[-1]}
    lrs = {k: v for k, v in series.items() if k.split("/")[-1] in ("lr", "learning_rate") or k.startswith("lr-")}
    height = 560
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 4), title, fill=(0, 0, 0))
    _panel(draw, (0, 20, width, 20 + 340), dict(list(losses.items())[:6]), "loss (log scale)", log_y=True)
    _panel(draw, (0, 370, width, height), dict(list(lrs.items())[:6]), "learning rate", log_y=False)
    return np.asarray(img)


def write_curves(run: Path) -> Optional[Path]:
    """Write ``RUN/curves.png`` from the run's local logs; ``None`` when it has none."""
    series, source = read_metrics(run)
    if not series:
        return None
    return save_png(run / "curves.png", curves_picture(series, f"{run} (from {source})"))


def main(argv: list[str] | None = None) -> None:
    root = Path((argv if argv is not None else sys.argv[1:] or ["runs"])[0])
    runs = sorted({p.parent.parent for p in root.glob("**/checkpoints/last.ckpt")}
                  | {p.parent for p in root.glob("**/config.yaml") if not (p.parent / "metadata.json").exists()})
    if not runs:
        print(f"no runs under {root}/")
    for run in runs:
        line = describe(run)
        curves = write_curves(run)
        print(line + (f", curves {curves}" if curves else ", no local logs for curves"))


if __name__ == "__main__":
    main()
