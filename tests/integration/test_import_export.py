"""``medsynth export`` → ``medsynth import`` → ``medsynth predict`` round-trips to the same samples; an export the
reference pipeline would sample wrongly is refused unless asked for; ``fit --model.init_from`` fine-tunes an
imported checkpoint; ``import`` refuses in one line through the installed command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from tests.conftest import make_seg_dataset
from tests.integration.test_cli import BASE, data_args, run
from tests.integration.test_console_refusals import medsynth
from tests.unit.test_convert import reference_unet, save_reference


@pytest.fixture
def round_trip(tmp_path):
    """A tiny one-hot mask-guided model, its export, and that export imported back."""
    img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 4, "val": 2, "test": 3})
    dargs = data_args(img, seg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert run("fit", *BASE, *dargs, "--trainer.max_steps", 2, "--trainer.default_root_dir", tmp_path / "run") == 0
    return tmp_path, dargs, ckpt


def test_export_import_predict_gives_the_original_samples(round_trip, capsys):
    tmp_path, dargs, ckpt = round_trip
    out = tmp_path / "export"
    export = ["export", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", out]
    # one-hot masks run silently wrong in the reference's pipeline: refused, in one line, nothing written
    capsys.readouterr()
    assert run(*export) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one_hot masks of 3 channels" in err[0] and "--allow_incompatible" in err[0]
    assert not out.exists()

    assert run(*export, "--allow_incompatible") == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    record = json.loads((out / "unet" / "config.json").read_text())["medsynth"]
    assert record["reference_pipeline"].startswith("INCOMPATIBLE: one_hot masks")
    assert record["num_classes"] == 3 and record["mask_encoding"] == "one_hot"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == "epsilon"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "SegGuidedDDIMPipeline"
    unet = UNet2DModel.from_pretrained(str(out), subfolder="unet")  # offline, as the reference's users load it
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    assert torch.equal(unet.conv_in.weight, state["net.unet.conv_in.weight"])
    assert DDIMScheduler.from_pretrained(str(out), subfolder="scheduler").config.num_train_timesteps == 1000

    imported = tmp_path / "imported.ckpt"
    assert run("import", "--source", out, "--output", imported) == 0  # the export's record answers --num_classes
    samples = {}
    for name, source in (("original", ckpt), ("imported", imported)):
        assert run("predict", *BASE, *dargs, "--ckpt_path", source, "--output_dir", tmp_path / name) == 0
        samples[name] = {p.name: np.load(p) for p in sorted((tmp_path / name / "samples").glob("*.npy"))}
    assert len(samples["original"]) == 3 and samples["original"].keys() == samples["imported"].keys()
    for key, array in samples["original"].items():
        assert np.array_equal(array, samples["imported"][key]), key

    # fine-tuning starts from the imported weights (with lr 0 they stay exactly as imported)
    tune = tmp_path / "tune"
    assert run("fit", *BASE, *dargs, "--model.init_from", imported, "--model.lr", 0, "--trainer.max_steps", 1,
               "--trainer.default_root_dir", tune) == 0
    tuned = torch.load(tune / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert tuned.keys() == state.keys() and all(torch.equal(tuned[k], state[k]) for k in state)
    # another architecture is refused before anything is written
    capsys.readouterr()
    assert run("fit", *BASE, *dargs, "--model.init_from", imported, "--model.net.init_args.block_out_channels",
               "[16, 16]", "--trainer.default_root_dir", tmp_path / "other") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "(model.init_from): its weights do not fit" in err[-1] and not (tmp_path / "other").exists()


def test_the_installed_import_refuses_in_one_line(tmp_path, capsys):
    source = save_reference(tmp_path / "pipe", reference_unet())
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = medsynth("import", "--source", source, "--output", tmp_path / "x.ckpt", cwd=tmp_path)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert len(err) == 1 and err[0].startswith("medsynth: error: ") and "--num_classes K" in err[0], result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    capsys.readouterr()
    assert run("import", "--source", source) == 2
    assert capsys.readouterr().err.strip() == "medsynth: error: import: the following arguments are required: --output"


def test_help_lists_import(capsys):
    assert run("--help") == 0
    assert "import" in capsys.readouterr().out.split("Available subcommands:")[1]
    assert run("import", "--help") == 0
    assert "--num_classes" in capsys.readouterr().out
