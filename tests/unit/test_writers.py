"""Prediction writers get what they record (output folder, run config) through their constructor: a Trainer with
no medsynth attributes is enough, and the config given lands in metadata.json and every sidecar."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from medsynth.writers import ReconstructionWriter, SampleWriter

CONFIG = {"model": {"class_path": "medsynth.modules.DiffusionModule"}, "seed": 11}


def plain_trainer(datamodule=None):
    """What a writer may use of a Trainer: Lightning's own attributes only."""
    return SimpleNamespace(world_size=1, precision="32-true", is_global_zero=True, datamodule=datamodule,
                           strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))


def test_sample_writer_records_the_config_it_was_given(tmp_path):
    model = SimpleNamespace(sampler=None, sample_seed=3, guidance_scale=1.0, class_names=None, latent_space=None)
    writer = SampleWriter(tmp_path / "out", metadata={"checkpoint": None}, config=CONFIG)
    trainer = plain_trainer()
    writer.on_predict_start(trainer, model)
    samples = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    writer.write_on_batch_end(trainer, model, {"sample": samples, "name": ["a", "b"], "index": [0, 1]}, None, None, 0)
    writer.on_predict_end(trainer, model)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["config"] == CONFIG and meta["num_samples"] == 2 and meta["seed"] == 3
    for name in ("a", "b"):
        assert json.loads((tmp_path / "out" / "samples" / f"{name}.json").read_text())["config"] == CONFIG
    assert (tmp_path / "out" / "samples" / "a.png").is_file() and (tmp_path / "out" / "grid.png").is_file()


def test_reconstruction_writer_records_the_config_it_was_given_or_none(tmp_path):
    recon = torch.zeros(1, 1, 4, 4)
    for config, out in ((CONFIG, tmp_path / "with"), (None, tmp_path / "without")):
        writer = ReconstructionWriter(out, metadata={"checkpoint": None}, config=config)
        trainer, model = plain_trainer(SimpleNamespace()), SimpleNamespace()
        writer.on_predict_start(trainer, model)
        writer.write_on_batch_end(trainer, model, {"reconstruction": recon, "name": ["x.png"], "index": [0]},
                                  None, None, 0)
        writer.on_predict_end(trainer, model)
        assert json.loads((out / "x.json").read_text())["config"] == config
        assert json.loads((out / "metadata.json").read_text())["config"] == config
