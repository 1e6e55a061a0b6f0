"""The hostile-input catalogue, second round (docs/robustness.md, cases 34-): files that do not decode, options that
cannot work, checkpoints and runs misused, output folders contested, manifests and class maps that contradict
themselves. Each case asserts exit status 2, exactly one line on stderr naming the file or value, and that nothing
was written. They call ``main()`` in-process for speed; ``test_console_refusals.py`` runs a sample of them through
the installed ``medsynth`` command, where Lightning's announcements would show."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_seg_dataset
from tests.integration.test_cli import BASE, CONFIGS, data_args, run
from tests.unit.test_class_data import make_class_folders

CLASS = ["--config", CONFIGS / "class2d.yaml", "--config", CONFIGS / "tests" / "tiny.yaml"]
AE3D = ["--config", CONFIGS / "ae3d.yaml", "--config", CONFIGS / "tests" / "tiny_ae3d.yaml"]


def assert_refused(capsys, code: int, culprit, *unwritten: Path) -> str:
    """Exit status 2, one stderr line ``medsynth: error: ...`` naming ``culprit``, no traceback, nothing written."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("medsynth: error: ") and str(culprit) in err[0], err
    for path in unwritten:
        assert not Path(path).exists(), f"{path} was written"
    return err[0]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# ---------------------------------------------------------------------------------------------------- data files
# Each takes the dataset dict and returns what the error must name; ``d["args"]`` may add options.


def png_corrupt_chunk_checksum(d):
    p = d["img"] / "train" / "case_train_000.png"
    raw = bytearray(p.read_bytes())
    raw[29] ^= 0xFF  # IHDR's CRC: Pillow raises SyntaxError ("broken PNG file")
    p.write_bytes(bytes(raw))
    return p


def png_decompression_bomb(d):
    p = d["img"] / "train" / "case_train_001.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                  + png_chunk(b"IEND", b""))
    return p


def png_16bit_colour(d):
    p = d["img"] / "train" / "case_train_001.png"
    rows = b"".join(b"\0" + np.full(24 * 3, 300, ">u2").tobytes() for _ in range(24))  # Pillow reads it as 8-bit
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 24, 16, 2, 0, 0, 0))
                  + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))
    return p


def npy_unterminated_header(d):
    p = d["img"] / "train" / "case_train_002.png"
    p.unlink()
    p = p.with_suffix(".npy")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (24, 24), 'x': '"  # tokenize.TokenError
    header += b" " * (63 - len(header) % 64) + b"\n"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 2304)
    return p


def npy_truncated_data(d):
    p = d["img"] / "train" / "case_train_002.png"
    p.unlink()
    p = p.with_suffix(".npy")
    np.save(p, np.ones((24, 24), np.float32))
    p.write_bytes(p.read_bytes()[:-100])
    return p


def npy_structured_dtype(d):
    p = d["img"] / "train" / "case_train_003.png"
    p.unlink()
    p = p.with_suffix(".npy")
    np.save(p, np.zeros((24, 24), dtype=[("a", "<f4"), ("b", "<i2")]))
    return p


def npy_content_in_png(d):
    p = d["img"] / "train" / "case_train_003.png"
    buf = p.with_suffix(".tmp.npy")
    np.save(buf, np.ones((24, 24), np.uint8))
    p.write_bytes(buf.read_bytes())
    buf.unlink()
    return p


def jpeg_content_in_png(d):
    p = d["img"] / "train" / "case_train_004.png"
    Image.open(p).save(p, format="JPEG")
    return p


def jpeg_mask(d):
    p = d["seg"] / "all" / "train" / "case_train_004.png"
    m = Image.open(p)
    p.unlink()
    p = p.with_suffix(".jpg")
    m.save(p, format="JPEG", quality=95)
    return p


def jpeg_content_in_mask_png(d):
    p = d["seg"] / "all" / "train" / "case_train_005.png"
    Image.open(p).save(p, format="JPEG", quality=100)
    return p


def palette_image(d):
    p = d["img"] / "train" / "case_train_005.png"
    Image.open(p).convert("P").save(p)
    return p


def cmyk_image(d):
    p = d["img"] / "train" / "case_train_006.png"
    p.unlink()
    p = p.with_suffix(".tif")
    Image.new("CMYK", (24, 24)).save(p)
    return p


def float_mask_with_fractions(d):
    p = d["seg"] / "all" / "train" / "case_train_006.png"
    p.unlink()
    p = p.with_suffix(".tif")
    Image.fromarray(np.full((24, 24), 1.5, np.float32)).save(p)  # a float TIFF label map
    return p


def unread_format_in_split(d):
    p = d["img"] / "train" / "case_train_100.gif"
    Image.new("L", (24, 24)).save(p)  # the scanner does not read GIFs: said, not skipped
    return p


def text_file_in_split(d):
    p = d["img"] / "val" / "notes.txt"
    p.write_text("scanned at 0.5 mm")
    return p


def folder_in_split(d):
    p = d["img"] / "train" / "more"
    p.mkdir()
    shutil.copy(d["img"] / "train" / "case_train_000.png", p / "case_train_200.png")
    return p


def two_files_one_name(d):
    p = d["img"] / "train" / "case_train_007.npy"
    np.save(p, np.zeros((24, 24), np.float32))
    return p


def mask_without_image(d):
    p = d["img"] / "train" / "case_train_007.png"
    p.unlink()
    return d["seg"] / "all" / "train" / "case_train_007.png"


def image_in_two_splits(d):
    p = d["img"] / "val" / "case_val_000.png"
    p.unlink()
    os.link(d["img"] / "train" / "case_train_000.png", p)  # the same file, seen in train and val
    return d["img"] / "train" / "case_train_000.png"


def empty_file(d):
    p = d["img"] / "train" / "case_train_001.png"
    p.write_bytes(b"")
    return p


# ---------------------------------------------------------------------------------------------------- manifests


def _records(d):
    return [{"image": str(p), "mask": str(d["seg"] / "all" / s / p.name), "split": s}
            for s in ("train", "val") for p in sorted((d["img"] / s).iterdir())]


def _manifest(d, text: str):
    m = d["root"] / "m.json"
    m.write_text(text)
    d["args"] = ["--data.manifest", m, "--data.img_dir", "null", "--data.seg_dir", "null"]
    return m


def manifest_duplicate_key(d):
    recs = _records(d)
    train = json.dumps([r for r in recs if r["split"] == "train"][:4])
    val = json.dumps([r for r in recs if r["split"] == "val"])
    return _manifest(d, f'{{"train": {train}, "val": {val}, "train": {train}}}')


def manifest_repeated_record(d):
    recs = _records(d)
    return _manifest(d, json.dumps(recs + [recs[2]]))


def manifest_image_in_two_splits(d):
    recs = _records(d)
    return _manifest(d, json.dumps(recs + [dict(recs[0], split="val")]))


def manifest_unknown_key(d):
    recs = _records(d)
    recs[1] = {"image": recs[1]["image"], "msk": recs[1]["mask"], "split": "train"}
    return _manifest(d, json.dumps(recs))


def manifest_nan(d):
    return _manifest(d, json.dumps(_records(d))[:-1] + ', {"image": NaN}]')


def manifest_not_utf8(d):
    m = _manifest(d, "")
    m.write_bytes(json.dumps(_records(d)).encode("utf-16"))
    return m


def manifest_split_contradiction(d):
    recs = _records(d)
    train = [dict(image=r["image"], mask=r["mask"]) for r in recs if r["split"] == "train"]
    val = [dict(image=r["image"], mask=r["mask"]) for r in recs if r["split"] == "val"]
    val[0]["split"] = "train"
    return _manifest(d, json.dumps({"train": train, "val": val}))


# ---------------------------------------------------------------------------------------------------- options


def option(flag, value, culprit=None):
    def case(d):
        d["args"] = [flag, value]
        return culprit or value

    case.__name__ = f"option_{flag.strip('-').replace('.', '_').replace('init_args_', '')}"
    return case


def run_folder_is_a_file(d):
    f = d["root"] / "taken"
    f.write_text("a file")
    d["run_dir"] = f / "run"
    return f


def predict_split_unknown(d):
    d["args"] = ["--data.predict_split", "everything"]
    return "everything"


CATALOGUE_2D = [
    png_corrupt_chunk_checksum, png_decompression_bomb, png_16bit_colour, npy_unterminated_header, npy_truncated_data,
    npy_structured_dtype, npy_content_in_png, jpeg_content_in_png, jpeg_mask, jpeg_content_in_mask_png,
    palette_image, cmyk_image, float_mask_with_fractions, unread_format_in_split, text_file_in_split,
    folder_in_split, two_files_one_name, mask_without_image, image_in_two_splits, empty_file,
    manifest_duplicate_key, manifest_repeated_record, manifest_image_in_two_splits, manifest_unknown_key,
    manifest_nan, manifest_not_utf8, manifest_split_contradiction,
    option("--data.batch_size", "0", "batch_size"), option("--data.num_workers", "-1", "num_workers"),
    option("--data.image_size", "15", "data.image_size=15"), option("--data.intensity_range", "[255, 0]",
                                                                    "data.intensity_range=[255.0, 0.0]"),
    option("--data.intensity_range", "[0, .nan]", "data.intensity_range"),
    option("--data.intensity_range", "[1000, 2000]", "lies outside data.intensity_range [1000, 2000]"),
    option("--data.num_samples", "-1", "num_samples"), option("--data.channels", "0", "channels"),
    option("--model.sampler.init_args.num_inference_steps", "5000", "num_inference_steps=5000"),
    run_folder_is_a_file, predict_split_unknown,
]


@pytest.mark.parametrize("corrupt", CATALOGUE_2D, ids=lambda f: f.__name__)
def test_hostile_2d_input_is_refused_in_one_line(corrupt, tmp_path, capsys):
    img, seg = make_seg_dataset(tmp_path / "data")
    d = {"root": tmp_path / "data", "img": img, "seg": seg, "args": [], "run_dir": tmp_path / "run"}
    culprit = corrupt(d)
    code = run("fit", *BASE, *data_args(img, seg), *d["args"], "--trainer.default_root_dir", d["run_dir"])
    assert_refused(capsys, code, culprit, d["run_dir"])


# ---------------------------------------------------------------------------------------------------- class maps


def class_map_duplicate_key(d):
    d["map"].write_text('{"0": "imgs/bright", "1": "imgs/dark", "0": "imgs/dark"}')
    return d["map"]


def class_map_padded_label(d):
    d["map"].write_text(json.dumps({"00": "imgs/bright", "1": "imgs/dark"}))
    return d["map"]


def class_map_mixed_keys(d):
    d["map"].write_text(json.dumps({"0": "imgs/bright", "dark": "imgs/dark"}))
    return d["map"]


def class_map_two_classes_one_folder(d):
    d["map"].write_text(json.dumps({"bright": "imgs/bright", "shiny": "imgs/../imgs/bright"}))
    return d["map"]


def class_folder_with_unread_file(d):
    p = d["root"] / "imgs" / "dark" / "scan.jpeg2"
    p.write_bytes(b"...")
    return p


def class_image_in_two_classes(d):
    src = next((d["root"] / "imgs" / "bright").glob("*.png"))
    os.link(src, d["root"] / "imgs" / "dark" / ("twin_" + src.name))
    return "twin_" + src.name


CATALOGUE_CLASSES = [class_map_duplicate_key, class_map_padded_label, class_map_mixed_keys,
                     class_map_two_classes_one_folder, class_folder_with_unread_file, class_image_in_two_classes]


@pytest.mark.parametrize("corrupt", CATALOGUE_CLASSES, ids=lambda f: f.__name__)
def test_hostile_class_map_is_refused_in_one_line(corrupt, tmp_path, capsys):
    make_class_folders(tmp_path / "imgs", names=("bright", "dark"), n=10)
    d = {"root": tmp_path, "map": tmp_path / "map.json"}
    d["map"].write_text(json.dumps({"0": "imgs/bright", "1": "imgs/dark"}))
    culprit = corrupt(d)
    run_dir = tmp_path / "run"
    code = run("fit", *CLASS, "--data.manifest", d["map"], "--trainer.default_root_dir", run_dir)
    assert_refused(capsys, code, culprit, run_dir)


# ---------------------------------------------------------------------------------------------------- 3D volumes


def _nifti(folder, name, array, suffix=".nii.gz"):
    import nibabel as nib

    p = folder / f"{name}{suffix}"
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), p)
    return p


def nifti_header_claims_huge_volume(d):
    p = d["vols"] / "b.nii"
    _nifti(d["vols"], "b", np.ones((16, 16, 16), np.float32), ".nii")
    raw = bytearray(p.read_bytes())
    raw[42:48] = struct.pack("<hhh", 32767, 32767, 32767)  # dim[1..3]
    p.write_bytes(bytes(raw))
    d["records"][1] = "b.nii"
    return p


def nifti_uncompressed_truncated(d):
    p = _nifti(d["vols"], "b", np.ones((16, 16, 16), np.float32), ".nii")
    p.write_bytes(p.read_bytes()[:2000])
    d["records"][1] = "b.nii"
    return p


def nifti_gzip_named_nii(d):
    p = d["vols"] / "b.nii"
    p.write_bytes((d["vols"] / "b.nii.gz").read_bytes())
    d["records"][1] = "b.nii"
    return p


def volume_manifest_duplicate_key(d):
    d["manifest_text"] = '[{"image": "a.nii.gz", "split": "train", "split": "val"}, {"image": "b.nii.gz"}]'
    return d["manifest"]


def volume_map_two_keys_one_folder(d):
    sub = d["vols"] / "set"
    sub.mkdir()
    for n in ("a", "b", "c"):
        shutil.copy(d["vols"] / f"{n}.nii.gz", sub)
    d["manifest_text"] = json.dumps({"one": "set", "two": "./set"})
    return d["manifest"]


def volume_map_padded_label(d):
    sub = d["vols"] / "set"
    sub.mkdir()
    d["manifest_text"] = json.dumps({"0": "set", "01": "."})
    return d["manifest"]


def volume_percentiles_reversed(d):
    d["args"] = ["--data.percentiles", "[99.5, 0.5]"]
    return "data.percentiles=[99.5, 0.5]"


CATALOGUE_3D = [nifti_header_claims_huge_volume, nifti_uncompressed_truncated, nifti_gzip_named_nii,
                volume_manifest_duplicate_key, volume_map_two_keys_one_folder, volume_map_padded_label,
                volume_percentiles_reversed]


@pytest.mark.parametrize("corrupt", CATALOGUE_3D, ids=lambda f: f.__name__)
def test_hostile_3d_input_is_refused_in_one_line(corrupt, tmp_path, capsys):
    vols = tmp_path / "data"
    vols.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _nifti(vols, name, rng.normal(100, 10, (16, 16, 16)).astype(np.float32))
    d = {"vols": vols, "args": [], "manifest": vols / "manifest.json", "records": ["a.nii.gz", "b.nii.gz", "c.nii.gz"]}
    culprit = corrupt(d)
    splits = ("train", "train", "val")
    d["manifest"].write_text(d.get("manifest_text") or json.dumps(
        [{"image": r, "split": s} for r, s in zip(d["records"], splits)]))
    run_dir = tmp_path / "run"
    code = run("fit", *AE3D, "--data.manifest", d["manifest"], *d["args"], "--trainer.default_root_dir", run_dir)
    assert_refused(capsys, code, culprit, run_dir)


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A tiny mask-guided run trained for 2 steps: ``(root, run_dir, data args)``."""
    root = tmp_path_factory.mktemp("seg_run")
    img, seg = make_seg_dataset(root / "data")
    run_dir = root / "run"
    dargs = data_args(img, seg)
    assert run("fit", *BASE, *dargs, "--trainer.max_steps", 2, "--trainer.default_root_dir", run_dir) == 0
    return root, run_dir, dargs


def _ckpt(seg_run):
    return seg_run[1] / "checkpoints" / "last.ckpt"


def predict_without_checkpoint(seg_run, tmp_path):
    return ["predict", *BASE, *seg_run[2], "--output_dir", tmp_path / "out"], "--ckpt_path"


def testing_without_checkpoint(seg_run, tmp_path):
    return ["test", *BASE, *seg_run[2]], "--ckpt_path"


def validate_without_checkpoint(seg_run, tmp_path):
    return ["validate", *BASE, *seg_run[2]], "--ckpt_path"


def export_without_checkpoint(seg_run, tmp_path):
    return ["export", *BASE, "--output_dir", tmp_path / "out"], "--ckpt_path"


def best_without_a_run(seg_run, tmp_path):
    return (["predict", *BASE, *seg_run[2], "--ckpt_path", "best", "--trainer.default_root_dir", tmp_path / "none",
             "--output_dir", tmp_path / "out"], tmp_path / "none" / "checkpoints" / "last.ckpt")


def last_without_a_run(seg_run, tmp_path):
    return (["fit", *BASE, *seg_run[2], "--ckpt_path", "last", "--trainer.default_root_dir", tmp_path / "none"],
            tmp_path / "none" / "checkpoints" / "last.ckpt")


def resume_with_other_class_count(seg_run, tmp_path):
    img, seg = seg_run[2][1], seg_run[2][3]
    copy = tmp_path / "copy"
    shutil.copytree(seg_run[1], copy)
    return (["fit", *BASE, *data_args(img, seg, k=4), "--ckpt_path", copy / "checkpoints" / "last.ckpt",
             "--trainer.max_steps", 4, "--trainer.default_root_dir", copy], "num_classes=3")


def second_fit_into_a_run(seg_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(seg_run[1], copy)
    return (["fit", *BASE, *seg_run[2], "--trainer.default_root_dir", copy],
            f"--ckpt_path {copy / 'checkpoints' / 'last.ckpt'}")


def truncated_checkpoint(seg_run, tmp_path):
    c = tmp_path / "cut.ckpt"
    c.write_bytes(_ckpt(seg_run).read_bytes()[:5000])
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", c, "--output_dir", tmp_path / "out"], c


def checkpoint_naming_a_missing_class(seg_run, tmp_path):
    ckpt = torch.load(_ckpt(seg_run), weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "medsynth.modules.NoSuchModule"
    c = tmp_path / "renamed.ckpt"
    torch.save(ckpt, c)
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", c, "--output_dir", tmp_path / "out"], c


def checkpoint_of_another_net(seg_run, tmp_path):
    ckpt = torch.load(_ckpt(seg_run), weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 4)
    ckpt["state_dict"][key] = torch.zeros(3, 3, 3, 3)
    c = tmp_path / "other_net.ckpt"
    torch.save(ckpt, c)
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", c, "--output_dir", tmp_path / "out"], c


def checkpoint_is_json(seg_run, tmp_path):
    c = tmp_path / "notes.ckpt"
    c.write_text('{"state_dict": {}}')
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", c, "--output_dir", tmp_path / "out"], c


def output_dir_is_a_file(seg_run, tmp_path):
    f = tmp_path / "out"
    f.write_text("taken")
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", f], f


def output_dir_under_a_file(seg_run, tmp_path):
    f = tmp_path / "taken"
    f.write_text("a file")
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", f / "out"], f / "out"


def output_dir_busy(seg_run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    import socket

    (out / "INCOMPLETE").write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))  # a live process
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", out, "--overwrite"], out


def output_dir_left_incomplete(seg_run, tmp_path):
    out = tmp_path / "failed"
    out.mkdir()
    (out / "INCOMPLETE").write_text(json.dumps({"pid": 2**22 + 7, "host": "gone"}))
    (out / "samples").mkdir()
    return ["predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", out], out


def export_of_a_segmenter(seg_run, tmp_path):
    ckpt = torch.load(_ckpt(seg_run), weights_only=True)  # a checkpoint of another kind of model
    ckpt["hyper_parameters"] = {"_class_path": "medsynth.modules.SegmenterModule", "num_classes": 3,
                                "image_channels": 1, "image_size": 16}
    ckpt["state_dict"] = {}
    c = tmp_path / "segmenter.ckpt"
    torch.save(ckpt, c)
    return ["export", *BASE, "--ckpt_path", c, "--output_dir", tmp_path / "out"], c


def scoring_an_incomplete_folder(seg_run, tmp_path):
    out = tmp_path / "samples"
    (out / "samples").mkdir(parents=True)
    (out / "metadata.json").write_text("{}")
    (out / "INCOMPLETE").write_text("{}")
    return (["test", "--config", CONFIGS / "segmenter2d.yaml", "--ckpt_path", _ckpt(seg_run), "--data",
             "medsynth.data.SampleDirDataModule", "--data.samples_dir", out], out)


RUN_CASES = [predict_without_checkpoint, testing_without_checkpoint, validate_without_checkpoint,
             export_without_checkpoint, best_without_a_run, last_without_a_run, resume_with_other_class_count,
             second_fit_into_a_run, truncated_checkpoint, checkpoint_naming_a_missing_class, checkpoint_of_another_net,
             checkpoint_is_json, output_dir_is_a_file, output_dir_under_a_file, output_dir_busy,
             output_dir_left_incomplete, export_of_a_segmenter, scoring_an_incomplete_folder]


@pytest.mark.parametrize("case", RUN_CASES, ids=lambda f: f.__name__)
def test_misused_checkpoints_runs_and_output_folders_are_refused_in_one_line(case, seg_run, tmp_path, capsys):
    args, culprit = case(seg_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in seg_run[1].rglob("*")}
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = run(*args)
    assert_refused(capsys, code, culprit)
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # nothing written (and nothing removed)
    assert {p: p.stat().st_mtime_ns for p in seg_run[1].rglob("*")} == before  # the run is untouched


# ---------------------------------------------------------------------------------------------------- runs and faults


def test_named_checkpoints_resolve_to_files_recorded_with_their_sha256(seg_run, tmp_path):
    root, run_dir, dargs = seg_run
    from medsynth.provenance import file_sha256

    for name in ("last", "best"):
        out = tmp_path / name
        assert run("predict", *BASE, *dargs, "--ckpt_path", name, "--trainer.default_root_dir", run_dir,
                   "--output_dir", out) == 0
        meta = json.loads((out / "metadata.json").read_text())
        ckpt = Path(meta["checkpoint"])
        assert ckpt.is_file() and ckpt.parent == (run_dir / "checkpoints").resolve()
        assert meta["checkpoint_sha256"] == file_sha256(ckpt)
        assert (ckpt.name == "last.ckpt") == (name == "last") and not (out / "INCOMPLETE").exists()


def test_a_moved_run_resumes_into_its_own_last_checkpoint_and_overridden_flags_are_reported(seg_run, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(seg_run[1], moved)  # copied (or moved): its checkpoint state names the old folder
    capsys.readouterr()
    assert run("fit", *BASE, *seg_run[2], "--ckpt_path", moved / "checkpoints" / "last.ckpt", "--trainer.max_steps", 4,
               "--model.lr", 0.5, "--trainer.default_root_dir", moved) == 0
    err = capsys.readouterr().err
    assert "medsynth: warning: a resumed run keeps the model settings saved in" in err and "model.lr=0.5" in err
    ckpts = sorted(p.name for p in (moved / "checkpoints").glob("last*.ckpt"))
    assert ckpts == ["last.ckpt"]  # not last-v1.ckpt beside a stale last.ckpt
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(_ckpt(seg_run), weights_only=True)["global_step"] == 2  # the original is untouched


def test_a_predict_failing_midway_leaves_its_folder_marked_incomplete(seg_run, tmp_path, capsys, monkeypatch):
    from medsynth import writers

    calls = []
    real = writers.save_npy

    def failing(path, array):
        calls.append(path)
        if len(calls) == 2:  # the disk fills up at the second sample
            _disk_full(path)
        return real(path, array)

    monkeypatch.setattr(writers, "save_npy", failing)
    out = tmp_path / "out"
    capsys.readouterr()
    code = run("predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", out,
               "--data.batch_size", 1)
    # the run had started, so Lightning's own announcements may precede it: one error line, naming the file
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medsynth: error:")]
    assert code == 2 and len(err) == 1 and str(calls[1]) in err[0] and "No space left" in err[0], err
    assert (out / "INCOMPLETE").is_file() and not (out / "metadata.json").exists()
    # the folder is not taken for a result: scoring refuses it, a new predict needs --overwrite
    assert run("predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", out) == 2
    assert "incomplete" in capsys.readouterr().err
    monkeypatch.setattr(writers, "save_npy", real)
    assert run("predict", *BASE, *seg_run[2], "--ckpt_path", _ckpt(seg_run), "--output_dir", out, "--overwrite") == 0
    assert not (out / "INCOMPLETE").exists() and (out / "metadata.json").is_file()


def _disk_full(path):
    import errno

    from medsynth.io import atomic_write

    def write(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    atomic_write(path, write)


def test_two_claims_of_one_output_folder_cannot_both_pass(tmp_path):
    """Processes started together on one folder: exactly one claims it (exclusive creation), the others are refused
    in one line, also with --overwrite while the first is alive."""
    import subprocess
    import sys
    import time

    out, go = tmp_path / "out", tmp_path / "go"
    code = ("import pathlib, sys, time\n"
            "from medsynth.errors import MedsynthError\n"
            "from medsynth.io import claim_output_dir\n"
            "try:\n"
            f"    claim_output_dir({str(out)!r}, overwrite=True)\n"
            "except MedsynthError as exc:\n"
            "    print(exc, file=sys.stderr); sys.exit(2)\n"
            f"while not pathlib.Path({str(go)!r}).exists():  # the winner stays alive until the others are done\n"
            "    time.sleep(0.05)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    deadline = time.monotonic() + 120
    while sum(p.poll() is not None for p in procs) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2, 2, 2], results
    assert all("another medsynth run" in err and str(out) in err for rc, err in results if rc == 2)
    assert (out / "INCOMPLETE").is_file()  # the winner exited without releasing: the folder stays marked
