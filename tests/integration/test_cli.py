"""End to end through the ``medsynth`` command, in-process, on tiny generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from medsynth.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = ["--config", str(CONFIGS / "seg2d.yaml"), "--config", str(CONFIGS / "tests" / "tiny.yaml")]


def run(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def data_args(img_dir, seg_dir, k=3):
    return ["--data.img_dir", img_dir, "--data.seg_dir", seg_dir, "--data.num_classes", k]


@pytest.fixture
def trained(seg_dataset, tmp_path):
    """A tiny mask-guided model trained for 4 steps; returns (run_dir, data args)."""
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "run"
    dargs = data_args(img_dir, seg_dir)
    assert run("fit", *BASE, *dargs, "--trainer.default_root_dir", run_dir) == 0
    return run_dir, dargs


def test_fit_keeps_config_and_checkpoints(trained):
    run_dir, _ = trained
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["num_classes"] == 3  # linked from the data
    assert "num_classes: 3" in (run_dir / "config.yaml").read_text()


def test_predict_writes_named_samples_grid_and_metadata_deterministically(trained, tmp_path, seg_dataset):
    run_dir, dargs = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out) == 0
    test_masks = sorted(p.name for p in (seg_dataset[1] / "all" / "test").iterdir())
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == test_masks
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == test_masks
    arr = np.load(out / "samples" / "case_test_000.npy")
    assert arr.shape == (1, 16, 16) and arr.dtype == np.float32 and -1 <= arr.min() and arr.max() <= 1
    png = np.array(Image.open(out / "samples" / "case_test_000.png"))
    assert png.shape == (16, 16) and png.dtype == np.uint8
    assert list(out.glob("*grid*.png"))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["checkpoint"] == str(ckpt.resolve())
    assert meta["sampler"]["class"] == "DDIMSampler" and meta["sampler"]["num_inference_steps"] == 3
    assert meta["seed"] == 0
    assert (out / "config.yaml").is_file()

    # same seed, same samples (bit for bit; up to float rounding with another batch size)
    out2 = tmp_path / "again"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out2) == 0
    assert np.array_equal(np.load(out2 / "samples" / "case_test_003.npy"), np.load(out / "samples" / "case_test_003.npy"))
    out_b3 = tmp_path / "batch3"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out_b3, "--data.batch_size", 3) == 0
    assert np.allclose(np.load(out_b3 / "samples" / "case_test_003.npy"), np.load(out / "samples" / "case_test_003.npy"),
                       atol=1e-4)
    # another seed, other samples; the sampler comes from the command line, not the checkpoint
    out3 = tmp_path / "seed1"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out3, "--seed", 1,
               "--model.sampler.init_args.num_inference_steps", 5) == 0
    assert not np.array_equal(np.load(out3 / "samples" / "case_test_000.npy"), arr)
    meta3 = json.loads((out3 / "metadata.json").read_text())
    assert meta3["seed"] == 1 and meta3["sampler"]["num_inference_steps"] == 5


def test_predict_refuses_non_empty_output_dir_unless_overwrite(trained, tmp_path, capsys):
    run_dir, dargs = trained
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("medsynth: error:") and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out, "--overwrite") == 0
    assert (out / "grid.png").is_file() and (out / "precious.txt").read_text() == "keep me"


def test_resume_continues_from_last_checkpoint(trained):
    run_dir, dargs = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert run("fit", *BASE, *dargs, "--trainer.default_root_dir", run_dir, "--trainer.max_steps", 7,
               "--ckpt_path", ckpt) == 0
    resumed = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert resumed["global_step"] == 7
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.1.yaml").is_file()


def test_export_writes_diffusers_unet(trained, tmp_path):
    run_dir, dargs = trained
    out = tmp_path / "export"
    # one-hot masks: the reference pipeline would sample it wrongly, so it is exported only when asked for
    export = ["export", *BASE, *dargs, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out,
              "--allow_incompatible"]
    assert run(*export) == 0
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    assert unet.config.in_channels == 1 + 3 and unet.config.out_channels == 1 and unet.config.sample_size == 16
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert torch.equal(unet.conv_in.weight, state["net.unet.conv_in.weight"])
    # an existing export is replaced only when asked, and then whole (no leftovers of the swap)
    assert run(*export) == 2
    assert run(*export, "--overwrite", "true") == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert UNet2DModel.from_pretrained(str(out / "unet")).config.in_channels == 4


def test_bad_data_fails_with_one_line_naming_the_file(seg_dataset, tmp_path, capsys):
    img_dir, seg_dir = seg_dataset
    (seg_dir / "all" / "train" / "case_train_001.png").unlink()
    code = run("fit", *BASE, *data_args(img_dir, seg_dir), "--trainer.default_root_dir", tmp_path / "run")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medsynth: error:") and "case_train_001.png" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_checkpoint_is_reported(seg_dataset, tmp_path, capsys):
    img_dir, seg_dir = seg_dataset
    code = run("predict", *BASE, *data_args(img_dir, seg_dir), "--ckpt_path", tmp_path / "nope.ckpt",
               "--output_dir", tmp_path / "o")
    assert code == 2 and "nope.ckpt: checkpoint does not exist" in capsys.readouterr().err


def test_unconditional_bf16_scalar_free_model(seg_dataset, tmp_path):
    img_dir, _ = seg_dataset
    run_dir = tmp_path / "uncond"
    args = [*BASE, "--data.img_dir", img_dir, "--data.num_classes", 0]
    assert run("fit", *args, "--trainer.default_root_dir", run_dir, "--trainer.precision", "bf16-mixed") == 0
    out = tmp_path / "uncond_samples"
    assert run("predict", *args, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out,
               "--data.num_samples", 5) == 0
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"sample_{i:05d}.png" for i in range(5)]
    assert not (out / "masks").exists()


def test_scalar_mask_encoding_and_ablation_train(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "scalar"
    assert run("fit", *BASE, *data_args(img_dir, seg_dir), "--model.mask_encoding", "scalar",
               "--model.mask_ablation_prob", 0.5, "--trainer.default_root_dir", run_dir) == 0
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert state["net.unet.conv_in.weight"].shape[1] == 2  # image + one k/255 channel


def test_wandb_runs_offline_without_a_key(trained, seg_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "wb"
    with pytest.warns(UserWarning, match="logging offline"):
        code = run("fit", *BASE, *data_args(img_dir, seg_dir), "--trainer.default_root_dir", run_dir,
                   "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                   "--trainer.logger.init_args.offline", "false", "--trainer.logger.init_args.project", "t")
    assert code == 0
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_predict_takes_the_architecture_from_the_checkpoint(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    dargs = data_args(img_dir, seg_dir)
    run_dir = tmp_path / "wide"
    assert run("fit", *BASE, *dargs, "--trainer.default_root_dir", run_dir, "--trainer.max_steps", 2,
               "--model.net.init_args.block_out_channels", "[16, 16]") == 0
    out = tmp_path / "s"  # the config says [8, 16]; the checkpoint's [16, 16] must win
    assert run("predict", *BASE, *dargs, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out) == 0
    assert len(list((out / "samples").glob("*.npy"))) == 4


def test_predict_with_only_the_recipe_reads_data_settings_from_the_checkpoint(trained, tmp_path):
    run_dir, _ = trained  # trained with 3 classes; configs/seg2d.yaml says 2 and names no folders
    out = tmp_path / "plain"
    assert run("predict", *BASE, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out) == 0
    assert len(list((out / "samples").glob("*.npy"))) == 4
    assert np.array(Image.open(out / "masks" / "case_test_000.png")).max() <= 2


def test_lr_find_suggests_a_learning_rate(seg_dataset, tmp_path, capsys):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "lrf"
    assert run("lr_find", *BASE, *data_args(img_dir, seg_dir), "--trainer.default_root_dir", run_dir,
               "--num_training", 30, "--min_lr", 1e-6, "--max_lr", 1e-2) == 0
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert len(result["lr"]) == len(result["loss"]) > 0
    assert 1e-6 <= result["suggestion"] <= 1e-2
    assert "suggested learning rate" in capsys.readouterr().out
    assert not (run_dir / "checkpoints").exists()
    # a second test keeps the first one's curve
    first = (run_dir / "lr_find.json").read_text()
    assert run("lr_find", *BASE, *data_args(img_dir, seg_dir), "--trainer.default_root_dir", run_dir,
               "--num_training", 10, "--min_lr", 1e-6, "--max_lr", 1e-2) == 0
    assert (run_dir / "lr_find.json").read_text() == first
    assert len(json.loads((run_dir / "lr_find.1.json").read_text())["lr"]) <= 10


@pytest.mark.slow
def test_compiled_net_trains_and_keeps_checkpoint_keys(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "compiled"
    assert run("fit", *BASE, *data_args(img_dir, seg_dir), "--model.compile", "true",
               "--trainer.default_root_dir", run_dir) == 0
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert "net.unet.conv_in.weight" in state


def test_channels_last_fit_with_ema_then_predict(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    run_dir, out = tmp_path / "cl", tmp_path / "cl_out"
    args = [*BASE, *data_args(img_dir, seg_dir), "--model.channels_last", "true"]
    assert run("fit", *args, "--trainer.default_root_dir", run_dir) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["channels_last"] is True
    assert any("EMA" in key for key in ckpt["callbacks"])  # the recipe's EMA averaged the channels-last weights
    weight = ckpt["state_dict"]["net.unet.conv_in.weight"]
    assert torch.isfinite(weight).all()
    assert run("predict", *args, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out) == 0
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == len(list((seg_dir / "all" / "test").iterdir()))
    assert np.asarray(Image.open(samples[0])).std() > 0


def test_multichannel_npy_images_keep_every_channel(tmp_path):
    from tests.conftest import make_seg_dataset

    img_dir, seg_dir = make_seg_dataset(tmp_path / "mc", channels=2, fmt="npy")
    run_dir, out = tmp_path / "mc_run", tmp_path / "mc_out"
    args = [*BASE, *data_args(img_dir, seg_dir), "--data.channels", 2]
    assert run("fit", *args, "--trainer.default_root_dir", run_dir, "--trainer.max_steps", 2) == 0
    assert run("predict", *BASE, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out) == 0
    arr = np.load(out / "samples" / "case_test_000.npy")
    assert arr.shape == (2, 16, 16)


def test_samples_are_marked_synthetic(trained, tmp_path, seg_dataset):
    from medsynth.provenance import file_sha256, provenance
    from medsynth.provenance import main as provenance_main

    run_dir, dargs = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "prov"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out, "--seed", 7) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["synthetic"] is True and meta["checkpoint_sha256"] == file_sha256(ckpt)
    assert meta["config"]["model"]["class_path"] == "medsynth.modules.DiffusionModule" and meta["config"]["seed"] == 7
    png, npy = out / "samples" / "case_test_001.png", out / "samples" / "case_test_001.npy"
    assert Image.open(png).text["medsynth:synthetic"] == "true"
    assert "SYNTHETIC" in Image.open(png).text["Description"]
    info = provenance(npy)
    assert info["synthetic"] is True and info["seed"] == 7 and info["checkpoint_sha256"] == meta["checkpoint_sha256"]
    assert info["config"] == meta["config"] and info["generator"].startswith("medsynth ") and info["created"]
    assert provenance(png)["index"] == info["index"]
    real = seg_dataset[0] / "train" / "case_train_000.png"
    assert provenance(real) is None
    assert provenance(out / "masks" / "case_test_001.png") is None  # the user's own conditioning mask is not synthetic
    assert provenance(out / "grid.png")["synthetic"] is True
    assert "torch" in meta["versions"] and meta["num_samples"] == 4
    assert provenance_main([str(png), str(npy)]) == 0
    assert provenance_main([str(png), str(real)]) == 1


def test_final_checkpoint_keeps_raw_and_averaged_weights(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    run_dir = tmp_path / "ema"  # 3 steps: training ends mid-epoch, after EMA has averaged 3 updates
    assert run("fit", *BASE, *data_args(img_dir, seg_dir), "--trainer.max_steps", 3,
               "--trainer.default_root_dir", run_dir) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    key = "net.unet.conv_in.weight"
    averaged, raw = ckpt["state_dict"][key], ckpt["current_model_state"][key]
    assert not torch.equal(averaged, raw)  # the raw weights a resume continues from are not the EMA copy


def test_a_checkpoint_alone_is_enough_to_predict(trained, tmp_path, seg_dataset):
    """No config, model or data class on the command line: they come from the checkpoint, as do the data folders,
    the net and the sampler it was trained with."""
    run_dir, _ = trained
    out = tmp_path / "alone"
    assert run("predict", "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out,
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false") == 0
    test_masks = sorted(p.name for p in (seg_dataset[1] / "all" / "test").iterdir())
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == test_masks
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sampler"]["class"] == "DDIMSampler" and meta["sampler"]["num_inference_steps"] == 3
