"""The guarded readers, output-folder claims and checkpoint-state moves of medsynth.io and RunCheckpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medsynth.callbacks.checkpoints import moved_checkpoint_state
from medsynth.errors import DataError, MedsynthError
from medsynth.io import (
    INCOMPLETE,
    abandon_output_dir,
    check_complete,
    claim_output_dir,
    content_kind,
    load_checkpoint,
    read_image_file,
    read_json,
    read_npy,
    release_output_dir,
)


def test_content_kind_judges_by_bytes_not_names(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "b.png", format="JPEG")
    np.save(tmp_path / "c.npy", np.zeros(3))
    torch.save({"x": torch.zeros(1)}, tmp_path / "d.ckpt")
    (tmp_path / "e.json").write_text(' {"a": 1}')
    (tmp_path / "f").write_bytes(b"")
    kinds = [content_kind(tmp_path / n) for n in ("a.png", "b.png", "c.npy", "d.ckpt", "e.json", "f")]
    assert kinds == ["png", "jpeg", "npy", "zip", "json", "empty"]


def test_read_json_refuses_repeated_keys_and_nan(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{"a": {"x": 1, "x": 2}}')
    with pytest.raises(DataError, match="repeats the key 'x'") as e:
        read_json(p, "manifest")
    assert str(p) in str(e.value)
    p.write_text('[1, NaN]')
    with pytest.raises(DataError, match="NaN"):
        read_json(p, "manifest")
    p.write_text('{"a": [1, 2}')
    with pytest.raises(DataError, match="line 1 column"):
        read_json(p, "manifest")


def test_read_npy_checks_the_header_before_the_data(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(100, dtype=">f4").reshape(10, 10))
    a = read_npy(p)
    assert a.dtype == np.float32 and a.dtype.isnative and a[3, 4] == 34
    assert read_npy(p, mmap=True).shape == (10, 10)
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled Python objects"):
        read_npy(p, "latent")
    np.save(p, np.zeros((1000, 1000), np.float64))
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(DataError, match="unreadable .npy latent"):
        read_npy(p, "latent")


def test_label_maps_must_be_lossless_and_single_channel(tmp_path):
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "m.png", format="JPEG")
    with pytest.raises(DataError, match="lossy"):
        read_image_file(tmp_path / "m.png", "mask", label_map=True)
    with pytest.raises(DataError, match="named .png but its content is JPEG"):
        read_image_file(tmp_path / "m.png", "image")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / "i16.png")
    assert read_image_file(tmp_path / "i16.png").dtype == np.uint16


def test_load_checkpoint_names_what_it_got(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(MedsynthError, match="is a folder"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "x.ckpt").write_text("hello")
    with pytest.raises(MedsynthError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "x.ckpt")
    torch.save([1, 2], tmp_path / "y.ckpt")
    with pytest.raises(MedsynthError, match="holds a list"):
        load_checkpoint(tmp_path / "y.ckpt")


def test_a_claim_is_undone_when_nothing_was_written_and_marks_a_folder_otherwise(tmp_path):
    out = tmp_path / "out"
    claim = claim_output_dir(out, overwrite=False)
    (out / "config.yaml").write_text("x: 1")
    assert abandon_output_dir(claim) and not out.exists()  # a refusal leaves nothing behind
    claim = claim_output_dir(out, overwrite=False)
    (out / "samples").mkdir()
    assert not abandon_output_dir(claim) and (out / INCOMPLETE).is_file()  # failed midway: marked
    with pytest.raises(DataError, match="incomplete output"):
        check_complete(out)
    with pytest.raises(MedsynthError, match="incomplete output of a run that failed"):
        claim_output_dir(out, overwrite=False)
    json.loads((out / INCOMPLETE).read_text())  # the marker says who wrote it
    release_output_dir(out)
    check_complete(out)


def test_a_moved_checkpoint_state_points_into_the_new_folder(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    for name in ("last.ckpt", "best-1.ckpt"):
        (new / name).write_bytes(b"")
    state = {"dirpath": "/old/ckpts", "last_model_path": "/old/ckpts/last.ckpt",
             "best_model_path": "/old/ckpts/best-1.ckpt", "kth_best_model_path": "/old/ckpts/gone.ckpt",
             "best_k_models": {"/old/ckpts/best-1.ckpt": 0.5, "/old/ckpts/gone.ckpt": 0.7}}
    moved = moved_checkpoint_state(state, str(new))
    assert moved["dirpath"] == str(new) and moved["last_model_path"] == str(new / "last.ckpt")
    assert moved["best_model_path"] == str(new / "best-1.ckpt") and moved["kth_best_model_path"] == ""
    assert moved["best_k_models"] == {str(new / "best-1.ckpt"): 0.5}


def test_configuration_errors_name_the_option():
    from medsynth.cli import _one_line

    text = ("Parser key \"data\": Problem with given class_path 'medsynth.data.SegGuidedImageDataModule': "
            "Parser key \"batch_size\": Not of type PositiveInt: 0 does not conform to restriction v>0")
    assert _one_line(text).startswith('Parser key "data.batch_size": Not of type PositiveInt')
