"""A sample of the hostile-input catalogue through the installed ``medsynth`` command, in a subprocess: there
Lightning would announce itself (seed, accelerator, tips) before a refusal; the user must see exactly one line on
stderr, nothing on stdout, exit status 2, and nothing written (docs/robustness.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import make_seg_dataset
from tests.integration.test_cli import BASE, data_args
from tests.integration.test_refusals import (
    jpeg_mask,
    manifest_duplicate_key,
    npy_unterminated_header,
    png_decompression_bomb,
)

MEDSYNTH = Path(sys.executable).with_name("medsynth")


def medsynth(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="default")  # warnings on: they must be held too
    return subprocess.run([str(MEDSYNTH), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def data_case(corrupt):
    def case(tmp_path):
        img, seg = make_seg_dataset(tmp_path / "data")
        d = {"root": tmp_path / "data", "img": img, "seg": seg, "args": []}
        culprit = corrupt(d)
        return ["fit", *BASE, *data_args(img, seg), *d["args"], "--trainer.default_root_dir", tmp_path / "run"], culprit

    case.__name__ = corrupt.__name__
    return case


def option_case(flag, value, culprit):
    def case(tmp_path):
        img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 2, "val": 1})
        args = ["fit", *BASE, *data_args(img, seg), flag, value, "--trainer.default_root_dir", tmp_path / "run"]
        return args, culprit

    case.__name__ = f"option_{flag.strip('-').replace('.', '_')}"
    return case


def predict_without_checkpoint(tmp_path):
    img, seg = make_seg_dataset(tmp_path / "data", counts={"test": 2})
    return ["predict", *BASE, *data_args(img, seg), "--output_dir", tmp_path / "out"], "--ckpt_path"


def second_fit_into_a_run(tmp_path):
    img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 2, "val": 1})
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run_dir / "checkpoints" / "last.ckpt")  # what an earlier run left
    return ["fit", *BASE, *data_args(img, seg), "--trainer.default_root_dir", run_dir], run_dir / "checkpoints"


CASES = [data_case(png_decompression_bomb), data_case(npy_unterminated_header), data_case(jpeg_mask),
         data_case(manifest_duplicate_key), option_case("--data.batch_size", 0, "batch_size"),
         option_case("--data.image_size", 15, "data.image_size=15"),
         predict_without_checkpoint, second_fit_into_a_run]


def listing(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """Every case run once, two commands at a time (each one mostly waits on its own imports), each in its own
    folder: name -> (folder, culprit, the folder's listing before the command, the command's result)."""
    prepared = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case.__name__)
        args, culprit = case(root)
        prepared[case.__name__] = (root, args, culprit, listing(root))
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = {name: pool.submit(medsynth, *args, cwd=root) for name, (root, args, _, _) in prepared.items()}
    return {name: (root, culprit, before, running[name].result())
            for name, (root, _, culprit, before) in prepared.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_the_installed_command_refuses_in_exactly_one_line(case, refused):
    root, culprit, before, result = refused[case.__name__]
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(err) == 1 and err[0].startswith("medsynth: error: ") and str(culprit) in err[0], result.stderr
    assert result.stdout == ""
    assert listing(root) == before  # nothing written


def test_the_installed_command_still_announces_a_run_that_starts(tmp_path):
    """What was held back is printed once the inputs pass: a refusal is quiet, a run is not."""
    img, seg = make_seg_dataset(tmp_path / "data", counts={"train": 2, "val": 1})
    result = medsynth("fit", *BASE, *data_args(img, seg), "--trainer.max_steps", 1, "--trainer.default_root_dir",
                      tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Seed set to" in result.stderr and "GPU available" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
