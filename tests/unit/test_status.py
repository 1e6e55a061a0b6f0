"""``medsynth.status`` draws RUN/curves.png from the run's own logs, with no network (issue #16)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medsynth.status import main, read_metrics, read_wandb_metrics, wandb_records


def write_csv_log(run, steps=40):
    """Rows as Lightning's CSVLogger writes them: training rows and sparse validation rows."""
    path = run / "lightning_logs" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "train/lr", "val/loss"])
        for s in range(steps):
            w.writerow([s // 10, s, 1.0 / (s + 1), 1e-4 * min(s, 10) / 10, ""])
            if s % 10 == 9:
                w.writerow([s // 10, s, "", "", 0.5 / (s + 1)])


def test_status_writes_curves_from_a_csv_log(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    write_csv_log(run)
    series, source = read_metrics(run)
    assert source == "metrics.csv"
    assert series["train/loss"][:2] == [(0.0, 1.0), (1.0, 0.5)] and len(series["train/loss"]) == 40
    assert series["val/loss"] == [(9.0 + 10 * i, 0.5 / (10 + 10 * i)) for i in range(4)]
    main([str(tmp_path / "runs")])
    assert "curves " in capsys.readouterr().out
    picture = np.asarray(Image.open(run / "curves.png"))
    assert picture.ndim == 3 and (picture != 255).any(axis=-1).mean() > 0.01  # something is drawn


def test_curves_come_from_the_wandb_run_files_without_syncing(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    # a fresh process: wandb keeps global settings from any earlier run in this one (e.g. a WandbLogger's)
    script = f"""
import wandb
run = wandb.init(mode="offline", dir={str(run_dir)!r}, project="medsynth-test", settings=wandb.Settings(silent=True))
for step in range(300):  # enough records to span several 32 KiB log blocks
    run.log({{"train/loss": 1.0 / (step + 1), "train/lr": 1e-4, "trainer/global_step": step, "note": "x" * 200}})
run.log({{"val/loss": 0.25, "trainer/global_step": 299}})
run.finish()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    subprocess.run([sys.executable, "-c", script], check=True, env={**env, "WANDB_MODE": "offline"}, cwd=tmp_path)
    series = read_wandb_metrics(run_dir)
    assert [s for s, _ in series["train/loss"]] == list(range(300))
    assert series["train/loss"][9] == (9.0, pytest.approx(0.1)) and series["val/loss"] == [(299.0, 0.25)]
    assert "note" not in series
    file = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    truncated = tmp_path / "partial.wandb"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a run still writing
    assert 0 < len(list(wandb_records(truncated))) < len(list(wandb_records(file)))
    (run_dir / "config.yaml").write_text("model: {}\n")  # what makes a folder a run for status
    main([str(tmp_path)])
    assert (run_dir / "curves.png").is_file()


def test_a_run_without_local_logs_gets_no_picture(tmp_path, capsys):
    run = tmp_path / "b"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    main([str(tmp_path)])
    assert "no local logs" in capsys.readouterr().out and not (run / "curves.png").exists()
