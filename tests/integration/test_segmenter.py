"""The faithfulness judge: a segmenter trained through `medsynth fit`, scored through `medsynth test`."""

from pathlib import Path

import torch

from tests.integration.test_cli import data_args, run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def seg_args(img_dir, seg_dir) -> list:
    """A tiny segmenter on the generated 24x24 data, quiet."""
    return ["--config", CONFIGS / "segmenter2d.yaml", *data_args(img_dir, seg_dir), "--data.image_size", 24,
            "--data.batch_size", 4, "--data.num_workers", 0, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--model.net.init_args.channels", "[8, 16]",
            "--model.net.init_args.strides", "[2]"]


def test_segmenter_learns_the_masks_and_reports_dice(seg_dataset, tmp_path, capsys):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "seg"
    base = seg_args(img_dir, seg_dir)
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


def test_scoring_a_sample_folder_gives_mask_faithfulness(seg_dataset, tmp_path, capsys):
    """Samples equal to the real test images score like the real images; noise scores far lower."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    img_dir, seg_dir = seg_dataset
    seg_run = tmp_path / "seg"
    base = seg_args(img_dir, seg_dir)
    assert run("fit", *base, "--trainer.max_steps", 150, "--model.lr", 3e-3, "--trainer.default_root_dir", seg_run) == 0
    seg_ckpt = seg_run / "checkpoints" / "last.ckpt"

    def sample_dir(name, make_sample):
        d = tmp_path / name
        (d / "samples").mkdir(parents=True)
        (d / "masks").mkdir()
        config = {"data": {"init_args": {"num_classes": 3, "channels": 1, "image_size": 24}}}
        (d / "metadata.json").write_text(json.dumps({"synthetic": True, "config": config}))
        for f in sorted((img_dir / "test").iterdir()):
            real = np.array(Image.open(f)).astype(np.float32) / 127.5 - 1
            np.save(d / "samples" / f"{f.stem}.npy", make_sample(real)[None])
            shutil.copy(seg_dir / "all" / "test" / f.name, d / "masks" / f.name)
        return d

    rng = np.random.default_rng(0)
    scores = {}
    for name, make in (("real", lambda r: r), ("noise", lambda r: rng.uniform(-1, 1, r.shape).astype(np.float32))):
        d = sample_dir(name, make)
        args = ["test", *base, "--ckpt_path", seg_ckpt, "--data", "medsynth.data.SampleDirDataModule",
                "--data.samples_dir", d]
        assert run(*args, "--trainer.default_root_dir", tmp_path / f"score_{name}") == 0
        scores[name] = json.loads((d / "scores.json").read_text())["scores"]["test/dice"]
        assert run(*args) == 2  # scores.json is not overwritten silently
        assert "already exists" in capsys.readouterr().err
    assert scores["real"] > 0.7 and scores["noise"] < scores["real"] - 0.3


def test_scoring_refuses_a_folder_without_metadata(tmp_path, capsys):
    (tmp_path / "s" / "samples").mkdir(parents=True)
    code = run("test", "--config", CONFIGS / "segmenter2d.yaml", "--data", "medsynth.data.SampleDirDataModule",
               "--data.samples_dir", tmp_path / "s")
    assert code == 2 and "no metadata.json" in capsys.readouterr().err
