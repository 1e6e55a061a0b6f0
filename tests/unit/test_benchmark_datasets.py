"""The held-out benchmark sets are what docs/benchmarks.md says they are (built from nilearn's MNI152 files)."""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import load_benchmark


def _index(path: Path) -> int:
    return int(re.search(r"_(\d{3})\.png$", path.name).group(1))


def test_coronal3_flair_labels_two_tissues_and_leaves_the_rest_of_the_brain_to_the_background(tmp_path, monkeypatch):
    info = load_benchmark("datasets", monkeypatch).build("coronal3_flair", tmp_path)
    assert info["num_classes"] == 3 and info["plane"] == "coronal"
    assert 25 <= info["splits"]["train"] <= 60 and info["splits"]["test"] > 0  # a few dozen training slices
    for split, n in info["splits"].items():
        images = sorted((tmp_path / "images" / split).glob("*.png"))
        assert len(images) == n == len(list((tmp_path / "masks" / "all" / split).glob("*.png")))
        assert all(_index(p) % 3 == 0 for p in images)  # every third slice
    img = np.asarray(Image.open(sorted((tmp_path / "images" / "train").glob("*.png"))[10]), dtype=float) / 255
    mask = np.asarray(Image.open(sorted((tmp_path / "masks" / "all" / "train").glob("*.png"))[10]))
    assert set(np.unique(mask)) == {0, 1, 2}
    # FLAIR-like: grey matter brighter than white matter; brain outside both (CSF, deep structures) is background
    assert img[mask == 1].mean() > img[mask == 2].mean() > 0.2
    assert ((mask == 0) & (img > 0.02)).sum() > 50


def test_sides3_flair_bands_one_hemisphere_from_lateral_to_medial(tmp_path, monkeypatch):
    info = load_benchmark("datasets", monkeypatch).build("sides3_flair", tmp_path)
    classmap = json.loads((tmp_path / "classmap.json").read_text())
    assert classmap == {"0": "level1", "1": "level2", "2": "level3"} and info["plane"] == "sagittal"
    counts = list(info["counts"].values())
    assert max(counts) - min(counts) <= 1 and sum(counts) >= 40
    index = {name: [_index(p) for p in (tmp_path / name).glob("*/*.png")] for name in classmap.values()}
    for name in classmap.values():
        assert all(len(list((tmp_path / name / split).glob("*.png"))) > 0 for split in ("train", "val", "test"))
    every = sorted(k for ks in index.values() for k in ks)
    assert every == list(range(every[0], every[-1] + 1))  # one contiguous run of slices: one hemisphere
    # level1 is the outermost band, level3 the one next to the midline
    assert min(index["level1"]) > max(index["level2"]) and min(index["level2"]) > max(index["level3"])
