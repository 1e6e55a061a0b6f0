"""A fit killed with SIGKILL resumes from its last checkpoint: steps, optimiser, scheduler and EMA continue."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for f in run_dir.glob("**/metrics.csv"):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def test_sigkilled_fit_resumes_and_its_loss_curve_joins_the_first(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "medsynth", "fit",
            "--config", str(CONFIGS / "seg2d.yaml"), "--config", str(CONFIGS / "tests" / "tiny.yaml"),
            "--data.img_dir", str(img_dir), "--data.seg_dir", str(seg_dir), "--data.num_classes", "3",
            "--model.lr", "3e-3", "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "40",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.flush_logs_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.default_root_dir", str(run_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt_dir = run_dir / "checkpoints"
    deadline, step = time.time() + 240, 0
    while time.time() < deadline and step < 8:  # last.ckpt is refreshed every epoch (2 steps here)
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        if (ckpt_dir / "last.ckpt").is_file():
            step = torch.load(ckpt_dir / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing half-written: every checkpoint on disk loads
    saved = {p.name: torch.load(p, weights_only=False, map_location="cpu") for p in ckpt_dir.glob("*.ckpt")}
    killed_at = max(c["global_step"] for c in saved.values())
    assert 0 < killed_at < 40
    before = losses(run_dir)

    resume = args + ["--ckpt_path", str(ckpt_dir / "last.ckpt")]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(ckpt_dir / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == 40
    opt_state = final["optimizer_states"][0]["state"]
    assert int(next(iter(opt_state.values()))["step"]) == 40  # AdamW continued, not restarted
    assert final["lr_schedulers"][0]["last_epoch"] == 40
    assert int(final["averaging_state"]["n_averaged"]) >= 40 - 1  # EMA kept its history
    after = {s: v for s, v in losses(run_dir).items() if s > killed_at}
    assert after and min(after) > killed_at  # the step count continued
    first = sum(before[s] for s in sorted(before)[:3]) / 3
    tail = [before[s] for s in sorted(before) if s <= killed_at][-3:]
    head = [after[s] for s in sorted(after)[:3]]
    # the resumed curve starts where the first one stopped, not back at the untrained loss
    assert abs(sum(head) / len(head) - sum(tail) / len(tail)) < abs(first - sum(tail) / len(tail))
