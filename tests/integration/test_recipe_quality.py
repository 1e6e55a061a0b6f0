"""The recipe on data it was not tuned on: seg2d + quick follows held-out masks (slow: ~10 min on 2 CPU cores).

Runs ``benchmarks/recipe_quality.py`` end to end on ``sagittal4_t2`` (31 training slices in a T2-like contrast,
4 classes, 32x32; the defaults were chosen on coronal T1 slices): a segmenter trained on the real images must find
the conditioning masks in the samples nearly as well as in the real test images. 500 steps keep it short (the
shipped quick.yaml trains 2000; docs/benchmarks.md has the curve).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_seg2d_quick_follows_held_out_masks(tmp_path):
    out = tmp_path / "quality.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_quality.py"), "--datasets", "sagittal4_t2",
                    "--variants", "quick", "--steps", "500", "--judge-steps", "800", "--work", str(tmp_path / "work"),
                    "--out", str(out)], check=True, cwd=ROOT)
    (row,) = json.loads(out.read_text())
    assert row["steps_reached"] == 500
    assert row["ceiling"] > 0.4  # the judge itself learned the tissues
    assert row["fraction"] >= 0.8, row
