"""A fit killed with SIGKILL resumes from its last checkpoint: steps, optimiser, scheduler and EMA continue."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def run_and_kill(args: list[str], ckpt_dir: Path, after_step: int, max_steps: int) -> tuple[dict, int]:
    """Start ``medsynth fit`` in a subprocess, SIGKILL it once ``last.ckpt`` has reached ``after_step``; return
    every checkpoint left on disk (each must load: nothing half-written) and the step it was killed at."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline, step = time.time() + 240, 0
    while time.time() < deadline and step < after_step:  # last.ckpt is refreshed every epoch (2 steps here)
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        if (ckpt_dir / "last.ckpt").is_file():
            step = torch.load(ckpt_dir / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = {p.name: torch.load(p, weights_only=False, map_location="cpu") for p in ckpt_dir.glob("*.ckpt")}
    killed_at = max(c["global_step"] for c in saved.values())
    assert 0 < killed_at < max_steps
    return saved, killed_at


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
    ckpt_dir = run_dir / "checkpoints"
    saved, killed_at = run_and_kill(args, ckpt_dir, after_step=8, max_steps=40)
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


# slow: the diffusion fit above covers SIGKILL and resume by default; test_autoencoder_cli resumes the GAN phase
@pytest.mark.slow
def test_sigkilled_gan_autoencoder_resumes_with_its_discriminator(tmp_path):
    """The GAN phase resumes whole: generator step count, both optimisers and the discriminator's weights."""
    from tests.integration.test_autoencoder_cli import write_volumes

    write_volumes(tmp_path / "vols", {"a": (12, 12, 12), "b": (12, 10, 12), "c": (10, 12, 12)})
    manifest = tmp_path / "vols" / "manifest.json"
    manifest.write_text('[{"image": "a.nii.gz", "split": "train"}, {"image": "b.nii.gz", "split": "train"}, '
                        '{"image": "c.nii.gz", "split": "val"}]')
    run_dir = tmp_path / "ae"
    args = [sys.executable, "-m", "medsynth", "fit", "--config", str(CONFIGS / "ae3d.yaml"),
            "--config", str(CONFIGS / "tests" / "tiny_ae3d.yaml"), "--data.manifest", str(manifest),
            "--trainer.max_steps", "30", "--trainer.default_root_dir", str(run_dir)]
    ckpt_dir = run_dir / "checkpoints"
    saved, killed_at = run_and_kill(args, ckpt_dir, after_step=6, max_steps=30)
    killed = saved["last.ckpt"]
    disc = {k: v for k, v in killed["state_dict"].items() if k.startswith("discriminator.")}
    assert disc and len(killed["optimizer_states"]) == 2

    done = subprocess.run(args + ["--ckpt_path", str(ckpt_dir / "last.ckpt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(ckpt_dir / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == 30  # generator steps, continued
    steps = [int(next(iter(o["state"].values()))["step"]) for o in final["optimizer_states"]]
    assert steps == [30, 29]  # generator Adam, and the discriminator's (GAN from step 1) continued, not restarted
    moved = [k for k, v in disc.items() if v.is_floating_point() and not torch.equal(v, final["state_dict"][k])]
    assert moved  # the discriminator kept training from the killed run's weights
