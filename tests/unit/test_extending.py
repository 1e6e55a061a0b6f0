"""docs/extending.md's worked example works: its net and YAML, written to files, train and sample through the CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from tests.integration.test_cli import CONFIGS, data_args, run

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def example_blocks() -> tuple[str, str]:
    """The python and yaml blocks of the worked example (the first of each in the page)."""
    text = DOC.read_text(encoding="utf-8")
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    yaml = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    return python, yaml


def test_the_documented_net_trains_and_samples(seg_dataset, tmp_path, monkeypatch):
    python, yaml = example_blocks()
    (tmp_path / "mynets.py").write_text(python)
    (tmp_path / "my_net.yaml").write_text(yaml)
    monkeypatch.syspath_prepend(str(tmp_path))
    img_dir, seg_dir = seg_dataset
    run_dir, out = tmp_path / "run", tmp_path / "samples"
    base = ["--config", CONFIGS / "seg2d.yaml", "--config", CONFIGS / "tests" / "tiny.yaml",
            "--config", tmp_path / "my_net.yaml"]
    try:
        assert run("fit", *base, *data_args(img_dir, seg_dir), "--trainer.default_root_dir", run_dir) == 0
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        assert ckpt["hyper_parameters"]["net"]["class_path"] == "mynets.TinyDenoiser"
        assert {k.split(".")[1] for k in ckpt["state_dict"] if k.startswith("net.")} == {"inp", "time", "mid", "out"}
        # predict rebuilds the net from the checkpoint alone (no net config on this command line)
        assert run("predict", "--config", CONFIGS / "seg2d.yaml", "--config", CONFIGS / "tests" / "tiny.yaml",
                   *data_args(img_dir, seg_dir), "--ckpt_path", run_dir / "checkpoints" / "last.ckpt",
                   "--output_dir", out) == 0
    finally:
        sys.modules.pop("mynets", None)
    samples = sorted((out / "samples").glob("*.npy"))
    assert len(samples) == len(list((seg_dir / "all" / "test").iterdir()))
    assert json.loads((out / "metadata.json").read_text(encoding="utf-8"))["checkpoint"].endswith("last.ckpt")
