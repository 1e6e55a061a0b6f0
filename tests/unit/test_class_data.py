import json

import numpy as np
import pytest
from PIL import Image

from medsynth.data import ClassImageDataModule
from medsynth.errors import DataError


def make_class_folders(root, names=("bright", "dark"), n=12, size=16):
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(200 if k == 0 else 50, 10, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i:03d}.png")
    return root


def dm(**kw):
    args = dict(image_size=8, batch_size=4, num_workers=0)
    args.update(kw)
    return ClassImageDataModule(**args)


def test_integer_class_map_gives_folder_names_in_label_order(tmp_path):
    make_class_folders(tmp_path / "imgs")
    (tmp_path / "map.json").write_text(json.dumps({"1": "imgs/dark", "0": "imgs/bright"}))
    d = dm(manifest=tmp_path / "map.json")
    assert d.class_names == ["bright", "dark"]
    d.setup("fit")
    train, val = d.datasets["train"], d.datasets["val"]
    assert len(train) + len(val) == 24 and len(val) > 0
    item = train[0]
    assert item["image"].shape == (1, 8, 8) and item["label"] in (0, 1)
    # the split is a function of the file name alone: rebuilding gives the same split
    d2 = dm(manifest=tmp_path / "map.json")
    d2.setup("fit")
    assert [r.name for r, _ in d2.datasets["val"].items] == [r.name for r, _ in val.items]
    brightness = {label: [] for label in (0, 1)}
    for i in range(len(train)):
        brightness[train[i]["label"]].append(float(train[i]["image"].mean()))
    assert min(brightness[0]) > max(brightness[1])  # labels follow the folders


def test_name_keyed_map_and_folder_per_class_layout(tmp_path):
    make_class_folders(tmp_path / "a")
    (tmp_path / "map.json").write_text(json.dumps({"T1": "a/bright", "T2": "a/dark"}))
    assert dm(manifest=tmp_path / "map.json").class_names == ["T1", "T2"]
    for split in ("train", "val"):
        make_class_folders(tmp_path / "root" / split, names=("ct", "mr"), n=3)
    d = dm(root=tmp_path / "root")
    d.setup("fit")
    assert d.class_names == ["ct", "mr"] and len(d.datasets["train"]) == 6 and len(d.datasets["val"]) == 6
    d.setup("predict")
    items = [d.datasets["predict"][i] for i in range(len(d.datasets["predict"]))]
    assert len(items) == 2 * d.samples_per_class
    assert {it["folder"] for it in items} == {"ct", "mr"} and items[-1]["label"] == 1


@pytest.mark.parametrize(
    "content,match",
    [({"0": "imgs/bright", "2": "imgs/dark"}, "label 2 is outside the class map; labels must be 0..1"),
     ({"0": "imgs/bright", "1": "imgs/nowhere"}, "missing folder"),
     ({"x/y": "imgs/bright"}, "cannot be a folder name")],
)
def test_bad_class_maps(tmp_path, content, match):
    make_class_folders(tmp_path / "imgs")
    (tmp_path / "map.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=match) as e:
        dm(manifest=tmp_path / "map.json")
    assert str(tmp_path / "map.json") in str(e.value) and "\n" not in str(e.value)


def test_empty_class_folder(tmp_path):
    make_class_folders(tmp_path / "imgs")
    (tmp_path / "imgs" / "empty").mkdir()
    (tmp_path / "map.json").write_text(json.dumps({"0": "imgs/bright", "1": "imgs/empty"}))
    with pytest.raises(DataError, match="empty class folder") as e:
        dm(manifest=tmp_path / "map.json").setup("fit")
    assert str(tmp_path / "imgs" / "empty") in str(e.value)
