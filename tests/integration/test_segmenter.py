"""The faithfulness judge: a segmenter trained through `medsynth fit`, scored through `medsynth test`."""

from pathlib import Path

import torch

from tests.integration.test_cli import data_args, run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_segmenter_learns_the_masks_and_reports_dice(seg_dataset, tmp_path, capsys):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "seg"
    base = ["--config", CONFIGS / "segmenter2d.yaml", *data_args(img_dir, seg_dir), "--data.image_size", 24,
            "--data.batch_size", 4, "--data.num_workers", 0, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--model.net.init_args.channels", "[8, 16]",
            "--model.net.init_args.strides", "[2]"]
    assert run("fit", *base, "--trainer.max_steps", 150, "--model.lr", 3e-3, "--trainer.default_root_dir", run_dir) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["num_classes"] == 3 and ckpt["global_step"] == 150
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    best_dice = float(torch.load(best, weights_only=False, map_location="cpu")["callbacks"][
        next(k for k in ckpt["callbacks"] if "RunCheckpoint" in k)]["best_model_score"])
    # rectangles whose intensity encodes the class: a small UNet separates them well within 150 steps
    assert best_dice > 0.7
    capsys.readouterr()
    assert run("test", *base, "--ckpt_path", best, "--trainer.default_root_dir", run_dir) == 0
    out = capsys.readouterr().out
    assert "test/dice" in out and "test/dice_class2" in out
