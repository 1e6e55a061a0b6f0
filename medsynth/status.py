"""``python -m medsynth.status [RUNS_DIR]``: one line per run folder with its progress."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


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


def main(argv: list[str] | None = None) -> None:
    root = Path((argv if argv is not None else sys.argv[1:] or ["runs"])[0])
    runs = sorted({p.parent.parent for p in root.glob("**/checkpoints/last.ckpt")}
                  | {p.parent for p in root.glob("**/config.yaml") if not (p.parent / "metadata.json").exists()})
    if not runs:
        print(f"no runs under {root}/")
    for run in runs:
        print(describe(run))


if __name__ == "__main__":
    main()
