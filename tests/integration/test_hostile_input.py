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
    assert len(err) == 1 and err[0].startswith("medsynth: error: ") and str(culprit) in err[0], err
    assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()  # nothing written


def test_debug_shows_the_traceback(tmp_path):
    img, seg = make_seg_dataset(tmp_path / "data")
    (seg / "all" / "val" / "case_val_000.png").unlink()
    from medsynth.errors import DataError

    with pytest.raises(DataError):
        run("fit", *BASE, *data_args(img, seg), "--trainer.default_root_dir", tmp_path / "run", "--debug")


# ---------------------------------------------------------------------------------------------------- 3D volumes
AE3D = ["--config", str(BASE[1]).replace("seg2d.yaml", "ae3d.yaml"),
        "--config", str(BASE[3]).replace("tiny.yaml", "tiny_ae3d.yaml")]


def _nifti(d, name, array):
    import nibabel as nib

    p = d["vols"] / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), p)
    return p


def nifti_nan(d):
    a = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    a[3, 4, 5] = np.nan
    return _nifti(d, "a", a)


def nifti_4d(d):
    return _nifti(d, "a", np.ones((16, 16, 16, 3), np.float32))


def nifti_wrong_channels(d):
    d["args"] = ["--data.channels", "2", "--model.net.init_args.in_channels", "2",  # a 2-channel model; the
                 "--model.discriminator.init_args.in_channels", "2"]               # volumes hold one channel
    return d["vols"] / "a.nii.gz"


def nifti_truncated_gzip(d):
    p = d["vols"] / "b.nii.gz"
    p.write_bytes(p.read_bytes()[:200])
    return p


def nifti_not_gzip(d):
    p = d["vols"] / "b.nii.gz"
    p.write_bytes(b"plain text, not gzip")
    return p


def patch_larger_than_volume(d):
    _nifti(d, "c", np.ones((16, 6, 16), np.float32))
    return d["vols"] / "c.nii.gz"


def volume_manifest_escaping_root(d):
    d["manifest"].write_text(json.dumps([{"image": "../../outside.nii.gz", "split": "train"}]))
    return d["manifest"]


def stage2_without_stage1_checkpoint(d):
    d["args"] = ["--config", AE3D[1].replace("ae3d.yaml", "ae3d_stage2.yaml"), "--data.patch_size", "16",
                 "--model.encode_patch_size", "8"]
    return "stage-1 checkpoint"


def stage1_checkpoint_missing(d):
    missing = d["root"] / "no_such_stage1.ckpt"
    d["args"] = ["--config", AE3D[1].replace("ae3d.yaml", "ae3d_stage2.yaml"), "--data.patch_size", "16",
                 "--model.encode_patch_size", "8", "--model.init_from", missing]
    return missing


def stage1_checkpoint_of_another_model(d):
    c = d["root"] / "diffusion.ckpt"
    torch.save({"state_dict": {"net.conv_in.weight": torch.zeros(8, 1, 3, 3)}, "hyper_parameters": {}}, c)
    d["args"] = ["--config", AE3D[1].replace("ae3d.yaml", "ae3d_stage2.yaml"), "--data.patch_size", "16",
                 "--model.encode_patch_size", "8", "--model.init_from", c]
    return c


def trainer_clipping_with_manual_optimisation(d):
    d["args"] = ["--trainer.gradient_clip_val", "1.0"]  # the GAN autoencoder clips by hand (model.gradient_clip)
    return "gradient_clip_val"


CATALOGUE_3D = [nifti_nan, nifti_4d, nifti_wrong_channels, nifti_truncated_gzip, nifti_not_gzip,
                patch_larger_than_volume, volume_manifest_escaping_root, stage2_without_stage1_checkpoint,
                stage1_checkpoint_missing, stage1_checkpoint_of_another_model, trainer_clipping_with_manual_optimisation]


@pytest.mark.parametrize("corrupt", CATALOGUE_3D, ids=lambda f: f.__name__)
def test_hostile_3d_input_is_refused_in_one_line(corrupt, tmp_path, capsys):
    vols = tmp_path / "data"
    vols.mkdir()
    d = {"root": tmp_path, "vols": vols, "args": [], "manifest": vols / "manifest.json"}
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _nifti(d, name, rng.normal(100, 10, (16, 16, 16)).astype(np.float32))
    d["manifest"].write_text(json.dumps([{"image": "a.nii.gz", "split": "train"}, {"image": "b.nii.gz", "split": "train"},
                                         {"image": "c.nii.gz", "split": "val"}]))
    culprit = corrupt(d)
    run_dir = tmp_path / "run"
    code = run("fit", *AE3D, "--data.manifest", d["manifest"], *d["args"], "--trainer.default_root_dir", run_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("medsynth: error: ") and str(culprit) in err[0], err
    assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()  # nothing written


# ---------------------------------------------------------------------------------------------------- at predict
def test_hostile_input_at_predict_is_refused_before_anything_is_written(tmp_path, capsys):
    """Prediction checks its inputs before the output folder is made: volumes with NaNs or a 4th axis for the
    3D autoencoder, and two masks that would write one output name (train/x and test/x with split ``all``)."""
    vols = tmp_path / "vols"
    vols.mkdir()
    d = {"vols": vols}
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _nifti(d, name, rng.normal(100, 10, (16, 16, 16)).astype(np.float32))
    manifest = vols / "manifest.json"
    manifest.write_text(json.dumps([{"image": f"{n}.nii.gz", "split": s} for n, s in
                                    (("a", "train"), ("b", "train"), ("c", "val"))]))
    ae_run = tmp_path / "ae"
    assert run("fit", *AE3D, "--data.manifest", manifest, "--trainer.max_steps", 1,
               "--trainer.default_root_dir", ae_run) == 0
    ae_ckpt = ae_run / "checkpoints" / "last.ckpt"
    cases = []
    for name, corrupt in (("nan", nifti_nan), ("four_d", nifti_4d)):
        sub = tmp_path / name
        sub.mkdir()
        bad = {"vols": sub}
        for n in ("b", "c"):
            (sub / f"{n}.nii.gz").write_bytes((vols / f"{n}.nii.gz").read_bytes())
        culprit = corrupt(bad)
        (sub / "manifest.json").write_text(manifest.read_text())
        cases.append((["predict", *AE3D, "--ckpt_path", ae_ckpt, "--data.manifest", sub / "manifest.json"], culprit))

    img, seg = make_seg_dataset(tmp_path / "data")
    seg_run = tmp_path / "seg"
    assert run("fit", *BASE, *data_args(img, seg), "--trainer.max_steps", 1, "--trainer.default_root_dir", seg_run) == 0
    for folder in (img, seg / "all"):  # a test mask named like a training one
        os.replace(folder / "test" / "case_test_000.png", folder / "test" / "case_train_000.png")
    cases.append((["predict", *BASE, *data_args(img, seg), "--ckpt_path", seg_run / "checkpoints" / "last.ckpt",
                   "--data.predict_split", "all"], "case_train_000"))

    for i, (args, culprit) in enumerate(cases):
        out = tmp_path / f"out{i}"
        capsys.readouterr()
        assert run(*args, "--output_dir", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medsynth: error: ") and str(culprit) in err[0], err
        assert not out.exists()
