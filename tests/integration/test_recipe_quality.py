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

from tests.conftest import load_benchmark

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


def test_class_similarity_tells_copies_from_samples_as_varied_as_real_images(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    class_similarity = load_benchmark("recipe_quality", monkeypatch).class_similarity

    rng = np.random.default_rng(0)

    base = np.add.outer(np.arange(16), np.arange(16)) * 7.0  # one image every class shares, plus noise

    def noise(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)).save(path)

    names = ["a", "b"]
    for name in names:
        for split in ("train", "val", "test"):
            for i in range(6):
                noise(tmp_path / "data" / name / split / f"{name}_{split}_{i}.png")
    (tmp_path / "data" / "classmap.json").write_text(json.dumps({str(k): n for k, n in enumerate(names)}))
    varied, copies = tmp_path / "varied", tmp_path / "copies"
    for name in names:
        for i in range(6):
            noise(varied / name / f"sample_{i:05d}.png")
        noise(copies / name / "sample_00000.png")
        for i in range(1, 6):
            (copies / name / f"sample_{i:05d}.png").write_bytes((copies / name / "sample_00000.png").read_bytes())
    like_real = class_similarity(varied, tmp_path / "data", 16)
    assert 0.2 < like_real["similarity_real"] < 0.9
    assert like_real["similarity_ratio"] == pytest.approx(1.0, abs=0.15)
    same = class_similarity(copies, tmp_path / "data", 16)
    assert same["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert same["similarity_ratio"] > 2 * like_real["similarity_ratio"]
