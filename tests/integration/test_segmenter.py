"""The faithfulness judge: a segmenter trained through `medsynth fit`, scored through `medsynth test`."""

from pathlib import Path

import pytest
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


class PooledFeatures(torch.nn.Module):
    """A stand-in for Inception in tests: uint8 images (N, 3, H, W) to 4x4-pooled grey levels (N, 16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1].float() / 255, 4).flatten(1)


def test_scoring_a_sample_folder_gives_mask_faithfulness_and_a_report(seg_dataset, tmp_path, capsys):
    """Samples equal to the real test images score like the real images (the ceiling); noise scores far lower,
    is more diverse and further from the real images by FID/KID."""
    import json

    import numpy as np
    from PIL import Image

    img_dir, seg_dir = seg_dataset
    seg_run = tmp_path / "seg"
    base = seg_args(img_dir, seg_dir)
    assert run("fit", *base, "--trainer.max_steps", 150, "--model.lr", 3e-3, "--trainer.default_root_dir", seg_run) == 0
    seg_ckpt = seg_run / "checkpoints" / "last.ckpt"
    # the judge on the real test split first: its scores become the ceiling of every later report
    assert run("test", *base, "--ckpt_path", seg_ckpt, "--trainer.default_root_dir", seg_run) == 0
    ceiling = json.loads((seg_run / "scores" / "real_test.json").read_text())["scores"]
    # measured again: the newest is the ceiling, the earlier one is kept
    assert run("test", *base, "--ckpt_path", seg_ckpt, "--trainer.default_root_dir", seg_run) == 0
    assert json.loads((seg_run / "scores" / "real_test.1.json").read_text())["scores"] == ceiling
    features = tmp_path / "features.pt"
    torch.jit.script(PooledFeatures()).save(str(features))

    def sample_dir(name, make_sample, mask_size=None):
        d = tmp_path / name
        (d / "samples").mkdir(parents=True)
        (d / "masks").mkdir()
        config = {"data": {"init_args": {"num_classes": 3, "channels": 1, "image_size": 24}}}
        (d / "metadata.json").write_text(json.dumps({"synthetic": True, "config": config}))
        for f in sorted((img_dir / "test").iterdir()):
            real = np.array(Image.open(f)).astype(np.float32) / 127.5 - 1
            np.save(d / "samples" / f"{f.stem}.npy", make_sample(real)[None])
            mask = Image.open(seg_dir / "all" / "test" / f.name)
            (mask.resize((mask_size, mask_size), Image.NEAREST) if mask_size else mask).save(d / "masks" / f.name)
        return d

    rng = np.random.default_rng(0)
    results = {}
    for name, make in (("real", lambda r: r), ("noise", lambda r: rng.uniform(-1, 1, r.shape).astype(np.float32))):
        d = sample_dir(name, make)
        args = ["test", *base, "--ckpt_path", seg_ckpt, "--data", "medsynth.data.SampleDirDataModule",
                "--data.samples_dir", d, "--data.features", features, "--data.real_dir", img_dir]
        assert run(*args, "--trainer.default_root_dir", tmp_path / f"score_{name}") == 0
        results[name] = json.loads((d / "scores.json").read_text())
        report = (d / "report.md").read_text()
        assert "test/dice" in report and "![dice](dice.png)" in report and (d / "dice.png").is_file()
        assert run(*args) == 2  # scores.json is not overwritten silently
        assert "already exists" in capsys.readouterr().err
    real, noise = results["real"]["scores"], results["noise"]["scores"]
    assert results["real"]["ceiling"] == ceiling and results["real"]["num_samples"] == 4
    assert real["test/dice"] == pytest.approx(ceiling["test/dice"], abs=1e-4)  # the same images: the ceiling
    assert real["test/dice"] > 0.7 and noise["test/dice"] < real["test/dice"] - 0.3
    assert noise["diversity/ms_ssim"] < real["diversity/ms_ssim"]
    assert noise["fid"] > 5 * real["fid"] and noise["kid_mean"] > real["kid_mean"]

    # without a feature network: scored all the same, and the report says what is missing
    d = sample_dir("plain", lambda r: r)
    assert run("test", *base, "--ckpt_path", seg_ckpt, "--data", "medsynth.data.SampleDirDataModule",
               "--data.samples_dir", d) == 0
    plain = json.loads((d / "scores.json").read_text())
    assert "fid" not in plain["scores"] and any("no local feature network" in n for n in plain["notes"])
    # another checkpoint of the same run has no ceiling until it is tested on real data itself
    other = seg_run / "checkpoints" / "other.ckpt"
    state = torch.load(seg_ckpt, weights_only=False)
    state["state_dict"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, other)
    d = sample_dir("by_other", lambda r: r)
    assert run("test", *base, "--ckpt_path", other, "--data", "medsynth.data.SampleDirDataModule",
               "--data.samples_dir", d) == 0
    by_other = json.loads((d / "scores.json").read_text())
    assert by_other["ceiling"] is None and any("another checkpoint" in n for n in by_other["notes"])

    # refused in one line, nothing written: masks of another size, a judge of another class count, a missing
    # feature network
    four = tmp_path / "seg4"
    assert run("fit", *seg_args(img_dir, seg_dir), "--data.num_classes", 4, "--trainer.max_steps", 1,
               "--trainer.default_root_dir", four) == 0
    cases = [
        (sample_dir("small_masks", lambda r: r, mask_size=12), seg_ckpt, [], "mask size 12x12 differs"),
        (sample_dir("three_classes", lambda r: r), four / "checkpoints" / "last.ckpt", [], "num_classes"),
        (sample_dir("no_features", lambda r: r), seg_ckpt, ["--data.features", tmp_path / "inception.pt",
                                                           "--data.real_dir", img_dir], "never downloaded"),
    ]
    for d, ckpt, extra, message in cases:
        capsys.readouterr()
        assert run("test", *base, "--ckpt_path", ckpt, "--data", "medsynth.data.SampleDirDataModule",
                   "--data.samples_dir", d, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (d / "scores.json").exists() and not (d / "report.md").exists()


def test_scoring_refuses_a_folder_without_metadata(tmp_path, capsys):
    (tmp_path / "s" / "samples").mkdir(parents=True)
    code = run("test", "--config", CONFIGS / "segmenter2d.yaml", "--data", "medsynth.data.SampleDirDataModule",
               "--data.samples_dir", tmp_path / "s")
    assert code == 2 and "no metadata.json" in capsys.readouterr().err
