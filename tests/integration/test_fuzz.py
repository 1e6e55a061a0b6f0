"""Fuzzing the readers through the real command: bytes of a PNG image, an NPY image, a NIfTI volume, a JSON manifest
and a checkpoint are mutated (flipped, zeroed, cut, inserted, duplicated) many times, and every outcome must be a
success with complete output or a one-line refusal naming the file with nothing written: never a traceback, a hang,
or a partial output (docs/robustness.md). The default run tries a few mutations of each; ``-m slow`` many."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_seg_dataset
from tests.integration.test_cli import BASE, CONFIGS, data_args, run

AE3D = ["--config", CONFIGS / "ae3d.yaml", "--config", CONFIGS / "tests" / "tiny_ae3d.yaml"]
FAST = ["--trainer.max_steps", 1]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation: flip bytes, zero a run, cut the end, insert random bytes, or repeat a slice."""
    b = bytearray(data)
    kind = int(rng.integers(5))
    n = len(b)
    if kind == 0:
        for i in rng.integers(0, n, int(rng.integers(1, 9))):
            b[i] = int(rng.integers(256))
    elif kind == 1:
        i, k = int(rng.integers(0, n)), int(rng.integers(1, 64))
        b[i : i + k] = bytes(len(b[i : i + k]))
    elif kind == 2:
        b = b[: int(rng.integers(0, n))]
    elif kind == 3:
        i = int(rng.integers(0, n + 1))
        b[i:i] = rng.bytes(int(rng.integers(1, 32)))
    else:
        i, j = sorted(int(v) for v in rng.integers(0, n, 2))
        b[j:j] = b[i : min(j, i + 256)]
    return bytes(b)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    img, seg = make_seg_dataset(root / "data", counts={"train": 4, "val": 2, "test": 2})
    assert run("fit", *BASE, *data_args(img, seg), *FAST, "--trainer.default_root_dir", root / "run") == 0
    return root / "run" / "checkpoints" / "last.ckpt"


def setup_png(tmp_path, ckpt):
    img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 4, "val": 2})
    target = img / "train" / "case_train_001.png"
    return target, ["fit", *BASE, *data_args(img, seg), *FAST], "run"


def setup_npy(tmp_path, ckpt):
    img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 4, "val": 2})
    png = img / "train" / "case_train_002.png"
    from PIL import Image

    target = png.with_suffix(".npy")
    np.save(target, np.asarray(Image.open(png)).astype(np.float32))
    png.unlink()
    return target, ["fit", *BASE, *data_args(img, seg), *FAST], "run"


def setup_manifest(tmp_path, ckpt):
    img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 4, "val": 2})
    target = tmp_path / "data" / "manifest.json"
    target.write_text(json.dumps({s: [{"image": f"images/{s}/{p.name}", "mask": f"masks/all/{s}/{p.name}"}
                                      for p in sorted((img / s).iterdir())] for s in ("train", "val")}))
    return target, ["fit", *BASE, "--data.manifest", target, "--data.num_classes", 3, *FAST], "run"


def setup_nifti(tmp_path, ckpt):
    import nibabel as nib

    vols = tmp_path / "vols"
    vols.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(rng.normal(100, 10, (12, 12, 12)).astype(np.float32), np.eye(4)),
                 vols / f"{name}.nii.gz")
    manifest = vols / "manifest.json"
    manifest.write_text(json.dumps([{"image": f"{n}.nii.gz", "split": s} for n, s in
                                    (("a", "train"), ("b", "train"), ("c", "val"))]))
    return vols / "b.nii.gz", ["fit", *AE3D, "--data.manifest", manifest, *FAST], "run"


def setup_checkpoint(tmp_path, ckpt):
    img, seg = make_seg_dataset(tmp_path / "data", counts={"test": 2})
    target = tmp_path / "model.ckpt"
    shutil.copy(ckpt, target)
    return target, ["predict", *BASE, *data_args(img, seg), "--ckpt_path", target], "out"


KINDS = {"png": setup_png, "npy": setup_npy, "manifest": setup_manifest, "nifti": setup_nifti,
         "checkpoint": setup_checkpoint}


def _timeout(signum, frame):
    raise TimeoutError("a medsynth command hung on a mutated file")


def fuzz(kind: str, seeds, tmp_path: Path, ckpt: Path, capsys) -> dict:
    outcomes = {"ok": 0, "refused": 0}
    for seed in seeds:
        case = tmp_path / f"{kind}_{seed}"
        target, args, out_name = KINDS[kind](case, ckpt)
        target.write_bytes(mutate(target.read_bytes(), np.random.default_rng(seed)))
        out = case / out_name
        where = ["--output_dir", out] if out_name == "out" else ["--trainer.default_root_dir", out]
        capsys.readouterr()
        previous = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(300)
        try:
            code = run(*args, *where)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        err = capsys.readouterr().err.strip().splitlines()
        context = f"{kind} seed {seed}: exit {code}, stderr {err[-3:]}"
        assert code in (0, 2), context
        if code == 2:
            assert len(err) == 1 and err[0].startswith("medsynth: error: ") and str(target) in err[0], context
            assert not out.exists(), context  # nothing written
            outcomes["refused"] += 1
        else:
            done = out / "metadata.json" if out_name == "out" else out / "checkpoints" / "last.ckpt"
            assert done.is_file() and not (out / "INCOMPLETE").exists(), context  # complete output
            outcomes["ok"] += 1
    return outcomes


@pytest.mark.parametrize("kind", list(KINDS))
def test_mutated_files_are_used_or_refused_in_one_line(kind, tmp_path, trained_checkpoint, capsys):
    outcomes = fuzz(kind, range(2), tmp_path, trained_checkpoint, capsys)
    assert sum(outcomes.values()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_many_mutated_files_are_used_or_refused_in_one_line(kind, tmp_path, trained_checkpoint, capsys):
    outcomes = fuzz(kind, range(100, 140), tmp_path, trained_checkpoint, capsys)
    assert outcomes["refused"] > 0  # the mutations did reach the readers
