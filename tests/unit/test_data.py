import json

import numpy as np
import pytest
import torch
from PIL import Image

from medsynth.data import SegGuidedImageDataModule
from medsynth.data.image2d import read_image, resize_mask, to_unit_range
from medsynth.data.manifest import read_manifest
from medsynth.errors import DataError
from tests.conftest import make_seg_dataset


def dm(img_dir, seg_dir, **kw):
    args = dict(img_dir=img_dir, seg_dir=seg_dir, num_classes=3, image_size=16, batch_size=4, num_workers=0)
    args.update(kw)
    return SegGuidedImageDataModule(**args)


def assert_one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert str(path) in msg


# ------------------------------------------------------------------ normalisation
def test_to_unit_range_by_dtype_and_explicit_range():
    assert np.allclose(to_unit_range(np.array([[[0, 255]]], dtype=np.uint8)), [[[-1, 1]]])
    assert np.allclose(to_unit_range(np.array([[[0, 65535]]], dtype=np.uint16)), [[[-1, 1]]])
    f = np.array([[[10.0, 20.0, 30.0]]], dtype=np.float32)
    assert np.allclose(to_unit_range(f), [[[-1, 0, 1]]])  # per-image min-max
    assert np.allclose(to_unit_range(f, (0, 20)), [[[0, 1, 1]]])  # clipped
    assert np.allclose(to_unit_range(np.zeros((1, 2, 2), np.float32)), 0)  # constant image: no NaN


def test_dataset_items_are_resized_normalised_and_masks_stay_integer(seg_dataset):
    img_dir, seg_dir = seg_dataset
    d = dm(img_dir, seg_dir, image_size=16)
    d.setup("fit")
    item = d.datasets["train"][0]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    batch = next(iter(d.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["mask"].shape == (4, 16, 16)


def test_random_flip_moves_image_and_mask_together(seg_dataset):
    img_dir, seg_dir = seg_dataset
    d = dm(img_dir, seg_dir, image_size=24, random_flip=True)
    d.setup("fit")
    ds = d.datasets["train"]
    plain = dm(img_dir, seg_dir, image_size=24, random_flip=False)
    plain.setup("fit")
    ref = plain.datasets["train"][0]
    torch.manual_seed(0)
    seen_flip = False
    for _ in range(20):
        it = ds[0]
        flipped = torch.equal(it["mask"], ref["mask"].flip(-1)) and not torch.equal(it["mask"], ref["mask"])
        if flipped:
            seen_flip = True
            assert torch.allclose(it["image"], ref["image"].flip(-1))
        else:
            assert torch.allclose(it["image"], ref["image"])
    assert seen_flip


def test_resize_mask_creates_no_new_labels():
    m = torch.zeros(37, 41, dtype=torch.long)
    m[5:20, 3:30] = 2
    m[22:, :] = 5
    out = resize_mask(m, 16)
    assert out.shape == (16, 16) and set(out.unique().tolist()) == {0, 2, 5}


def test_npy_channel_layouts(tmp_path):
    a = np.random.rand(4, 5, 3).astype(np.float32)
    np.save(tmp_path / "hwc.npy", a)
    np.save(tmp_path / "chw.npy", np.moveaxis(a, -1, 0))
    assert read_image(tmp_path / "hwc.npy", 3).shape == (3, 4, 5)
    assert np.array_equal(read_image(tmp_path / "hwc.npy", 3), read_image(tmp_path / "chw.npy", 3))
    np.save(tmp_path / "many.npy", np.random.rand(7, 8, 8).astype(np.float32))
    assert read_image(tmp_path / "many.npy", 7).shape == (7, 8, 8)


def test_npy_dataset_with_rgb_channels(tmp_path):
    img_dir, seg_dir = make_seg_dataset(tmp_path, channels=3, fmt="npy")
    d = dm(img_dir, seg_dir, channels=3)
    d.setup("fit")
    assert d.datasets["train"][0]["image"].shape == (3, 16, 16)


# ------------------------------------------------------------------ validation: one line naming the file
def test_missing_partner_mask(seg_dataset):
    img_dir, seg_dir = seg_dataset
    victim = seg_dir / "all" / "train" / "case_train_003.png"
    victim.unlink()
    with pytest.raises(DataError, match="missing partner mask") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, "case_train_003.png")


def test_label_at_or_above_num_classes(seg_dataset):
    img_dir, seg_dir = seg_dataset
    bad = seg_dir / "all" / "val" / "case_val_001.png"
    m = np.array(Image.open(bad))
    m[0, 0] = 3
    Image.fromarray(m).save(bad)
    with pytest.raises(DataError, match="label 3 >= data.num_classes=3") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, bad)


def test_unreadable_file(seg_dataset):
    img_dir, seg_dir = seg_dataset
    bad = img_dir / "train" / "case_train_002.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="unreadable image") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, bad)


def test_size_mismatch(seg_dataset):
    img_dir, seg_dir = seg_dataset
    bad = seg_dir / "all" / "train" / "case_train_000.png"
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(bad)
    with pytest.raises(DataError, match="differs from its image") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, bad)


def test_channel_mismatch(seg_dataset):
    img_dir, seg_dir = seg_dataset
    with pytest.raises(DataError, match="has 1 channels, expected 3") as e:
        dm(img_dir, seg_dir, channels=3).setup("fit")
    assert_one_line_naming(e, img_dir / "train")


def test_empty_split(seg_dataset):
    img_dir, seg_dir = seg_dataset
    for f in (img_dir / "val").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="empty split 'val'") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, img_dir / "val")


def test_nan_intensities(tmp_path):
    img_dir, seg_dir = make_seg_dataset(tmp_path, fmt="npy")
    bad = img_dir / "train" / "case_train_001.npy"
    a = np.load(bad)
    a[2, 2] = np.nan
    np.save(bad, a)
    with pytest.raises(DataError, match="NaN") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, bad)


def test_rgb_mask_is_rejected(seg_dataset):
    img_dir, seg_dir = seg_dataset
    bad = seg_dir / "all" / "train" / "case_train_004.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="single-channel") as e:
        dm(img_dir, seg_dir).setup("fit")
    assert_one_line_naming(e, bad)


def test_unconditional_data_ignores_masks(seg_dataset):
    img_dir, _ = seg_dataset
    d = dm(img_dir, None, num_classes=0)
    d.setup("fit")
    assert "mask" not in d.datasets["train"][0]
    d.setup("predict")
    assert len(d.datasets["predict"]) == d.num_samples


def test_predict_needs_only_masks(seg_dataset):
    img_dir, seg_dir = seg_dataset
    for f in (img_dir / "test").iterdir():
        f.unlink()
    d = dm(img_dir, seg_dir)
    d.setup("predict")
    item = d.datasets["predict"][0]
    assert "image" not in item and item["mask"].shape == (16, 16) and item["name"] == "case_test_000.png"


# ------------------------------------------------------------------ manifests
def test_manifest_resolves_relative_paths_and_splits(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    root = img_dir.parent
    records = {
        split: [
            {"image": f"images/{split}/{p.name}", "mask": f"masks/all/{split}/{p.name}"}
            for p in sorted((img_dir / split).iterdir())
        ]
        for split in ("train", "val", "test")
    }
    (root / "m.json").write_text(json.dumps(records))
    recs = read_manifest(root / "m.json")
    assert len(recs) == 16 and all(r.image.is_file() and r.mask.is_file() for r in recs)
    d = SegGuidedImageDataModule(manifest=root / "m.json", num_classes=3, image_size=16, num_workers=0)
    d.setup("fit")
    assert len(d.datasets["train"]) == 8 and len(d.datasets["val"]) == 4
    flat = [dict(r, split=s) for s, rs in records.items() for r in rs]
    (root / "flat.json").write_text(json.dumps(flat))
    assert read_manifest(root / "flat.json") == recs


@pytest.mark.parametrize(
    "content,match",
    [("{not json", "not valid JSON"), ('[{"mask": "a.png", "split": "holdout"}]', "split 'holdout'"),
     ('[{"split": "train"}]', "neither 'image' nor 'mask'")],
)
def test_bad_manifest(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        read_manifest(p)
    assert_one_line_naming(e, p)


def test_manifest_naming_missing_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps([{"image": "nope.png", "split": s} for s in ("train", "val")]))
    d = SegGuidedImageDataModule(manifest=p, num_classes=0, num_workers=0)
    with pytest.raises(DataError, match="does not exist") as e:
        d.setup("fit")
    assert_one_line_naming(e, tmp_path / "nope.png")
