"""The hostile-input catalogue (docs/robustness.md): each malformed input gets one line naming it, exit status 2,
no traceback, and nothing written."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_seg_dataset
from tests.integration.test_cli import BASE, data_args, run


def truncated_png(d):
    p = d["img"] / "train" / "case_train_000.png"
    p.write_bytes(p.read_bytes()[:60])
    return p


def not_an_image(d):
    p = d["img"] / "train" / "case_train_001.png"
    p.write_bytes(b"GIF89a but not really")
    return p


def label_too_large(d):
    p = d["seg"] / "all" / "train" / "case_train_002.png"
    m = np.array(Image.open(p))
    m[0, 0] = 7
    Image.fromarray(m).save(p)
    return p


def negative_label(d):
    p = d["seg"] / "all" / "train" / "case_train_003.png"
    p.unlink()
    p = p.with_suffix(".npy")
    np.save(p, -np.ones((24, 24), np.int16))
    return p


def fractional_label(d):
    p = d["seg"] / "all" / "train" / "case_train_003.png"
    p.unlink()
    p = p.with_suffix(".npy")
    np.save(p, np.full((24, 24), 0.5, np.float32))
    return p


def missing_partner(d):
    p = d["seg"] / "all" / "val" / "case_val_001.png"
    p.unlink()
    return p


def size_mismatch(d):
    p = d["seg"] / "all" / "train" / "case_train_004.png"
    Image.fromarray(np.zeros((12, 24), np.uint8)).save(p)
    return p


def wrong_channels(d):
    p = d["img"] / "train" / "case_train_005.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(p)
    return p


def rgb_mask(d):
    p = d["seg"] / "all" / "train" / "case_train_005.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(p)
    return p


def _npy_image(d, array):
    p = d["img"] / "train" / "case_train_006.png"
    p.unlink()
    p = p.with_suffix(".npy")
    np.save(p, array)
    return p


def nan_intensity(d):
    a = np.ones((24, 24), np.float32)
    a[3, 3] = np.nan
    return _npy_image(d, a)


def inf_intensity(d):
    a = np.ones((24, 24), np.float32)
    a[3, 3] = np.inf
    return _npy_image(d, a)


def zero_sized(d):
    return _npy_image(d, np.zeros((0, 24), np.float32))


def four_dimensional(d):
    return _npy_image(d, np.zeros((1, 1, 24, 24), np.float32))


def pickled_object_array(d):
    p = d["img"] / "train" / "case_train_007.png"
    p.unlink()
    p = p.with_suffix(".npy")
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return p


def symlink_loop(d):
    p = d["img"] / "train" / "case_train_000.png"
    p.unlink()
    os.symlink(p.name, p)  # points at itself
    return p


def empty_split(d):
    for f in (d["img"] / "val").iterdir():
        f.unlink()
    return d["img"] / "val"


def gzip_image(d):
    p = d["img"] / "train" / "case_train_001.png"
    p.write_bytes(gzip.compress(b"\x00" * 100)[:30])  # a truncated gzip where a PNG should be
    return p


def manifest_escaping_root(d):
    m = d["root"] / "sub" / "m.json"
    m.parent.mkdir()
    m.write_text(json.dumps([{"image": "../../../../etc/hostname", "split": "train"}]))
    d["args"] = ["--data.manifest", m, "--data.img_dir", "null", "--data.seg_dir", "null"]
    return m


def manifest_not_json(d):
    m = d["root"] / "m.json"
    m.write_text("{'single': 'quotes'}")
    d["args"] = ["--data.manifest", m]
    return m


def yaml_unknown_key(d):
    y = d["root"] / "extra.yaml"
    y.write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    d["args"] = ["--config", y]
    return "learning_rat"


def foreign_checkpoint(d):
    c = d["root"] / "other.ckpt"
    torch.save({"model": {"weight": torch.zeros(2)}}, c)
    d["args"] = ["--ckpt_path", c]
    return c


def garbage_checkpoint(d):
    c = d["root"] / "garbage.ckpt"
    c.write_bytes(b"\x80\x04not a pickle at all")
    d["args"] = ["--ckpt_path", c]
    return c


CATALOGUE = [truncated_png, not_an_image, label_too_large, negative_label, fractional_label, missing_partner,
             size_mismatch, wrong_channels, rgb_mask, nan_intensity, inf_intensity, zero_sized, four_dimensional,
             pickled_object_array, symlink_loop, empty_split, gzip_image, manifest_escaping_root, manifest_not_json,
             yaml_unknown_key, foreign_checkpoint, garbage_checkpoint]


@pytest.mark.parametrize("corrupt", CATALOGUE, ids=lambda f: f.__name__)
def test_hostile_input_is_refused_in_one_line(corrupt, tmp_path, capsys):
    img, seg = make_seg_dataset(tmp_path / "data")
    d = {"root": tmp_path / "data", "img": img, "seg": seg, "args": []}
    culprit = corrupt(d)
    run_dir = tmp_path / "run"
    code = run("fit", *BASE, *data_args(img, seg), *d["args"], "--trainer.default_root_dir", run_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("medsynth: error: ") and str(culprit) in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()  # nothing written


def test_debug_shows_the_traceback(tmp_path):
    img, seg = make_seg_dataset(tmp_path / "data")
    (seg / "all" / "val" / "case_val_000.png").unlink()
    from medsynth.errors import DataError

    with pytest.raises(DataError):
        run("fit", *BASE, *data_args(img, seg), "--trainer.default_root_dir", tmp_path / "run", "--debug")
