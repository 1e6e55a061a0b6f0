"""3D NIfTI data: manifests, validation, normalisation, augmentation, the patch DataModule and the 3D demo."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from medsynth.data.demo import MNI152VolumeDataModule, mni152_files
from medsynth.data.volumes import (
    Normalization,
    RandomRot90,
    Rot90,
    VolumeDataModule,
    VolumeRecord,
    assign_splits,
    check_volume,
    read_volume_manifest,
)
from medsynth.errors import DataError

SHAPE = (20, 24, 16)
# axes permuted, anisotropic and shifted: anything that assumed an identity affine or RAS order would show
AFFINE = np.array([[0.0, -1.5, 0.0, 12.0], [2.0, 0.0, 0.0, -30.0], [0.0, 0.0, 1.2, 7.5], [0.0, 0.0, 0.0, 1.0]])


def write_volume(path, shape=SHAPE, seed=0, data=None):
    """A smooth random volume (a blob on a zero background) as NIfTI; returns its path."""
    if data is None:
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape[:3]], indexing="ij"))
        data = (200 * np.exp(-(grid**2).sum(0) * 2) + rng.uniform(0, 20, shape[:3])).astype(np.float32)
        data[:2] = 0
        if len(shape) == 4:
            data = np.stack([data * (c + 1) for c in range(shape[3])], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def write_manifest(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def volumes_dataset(root, n=4):
    """``n`` volumes listed without splits in ``root/manifest.json``."""
    for i in range(n):
        write_volume(root / "vols" / f"case{i}.nii.gz", seed=i)
    return write_manifest(root / "manifest.json", [{"image": f"vols/case{i}.nii.gz"} for i in range(n)])


# ---------------------------------------------------------------------------------------------------- manifests


def test_record_manifest_resolves_paths_labels_and_splits(tmp_path):
    write_volume(tmp_path / "a" / "x.nii.gz")
    write_volume(tmp_path / "y.nii")
    m = write_manifest(tmp_path / "manifest.json", [{"image": "a/x.nii.gz", "label": 1, "split": "val"},
                                                    {"image": str(tmp_path / "y.nii"), "label": 0}])
    assert read_volume_manifest(m) == [VolumeRecord("x", tmp_path / "a" / "x.nii.gz", 1, "val"),
                                       VolumeRecord("y", tmp_path / "y.nii", 0, None)]


def test_folder_maps_list_every_volume_and_integer_keys_are_labels(tmp_path):
    for name in ("b", "a"):
        write_volume(tmp_path / "healthy" / f"{name}.nii.gz")
    write_volume(tmp_path / "tumour" / "c.nii")
    (tmp_path / "tumour" / "notes.txt").write_text("not a volume")
    by_name = read_volume_manifest(write_manifest(tmp_path / "n.json", {"h": "healthy", "t": "tumour"}))
    assert [(r.name, r.label, r.split) for r in by_name] == [("a", None, None), ("b", None, None), ("c", None, None)]
    by_label = read_volume_manifest(write_manifest(tmp_path / "l.json", {"1": "tumour", "0": "healthy"}))
    assert {r.name: r.label for r in by_label} == {"a": 0, "b": 0, "c": 1}
    assert all(r.image.is_absolute() and r.image.is_file() for r in by_label)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"image": "../outside.nii.gz"}]', "leaves the manifest's folder"),
        ('{"x": "../elsewhere"}', "leaves the manifest's folder"),
        ('[{"image": "v/a.nii.gz"}, {"image": "w/a.nii.gz"}]', "two volumes are named 'a'"),
        ("[{'image': 1}", "not valid JSON"),
        ('[{"image": "v/missing.nii.gz"}]', "does not exist"),
        ('{"x": "empty"}', "holds no volumes"),
        ('{"x": "nowhere"}', "missing folder"),
        ('[{"image": "v/a.nii.gz", "split": "training"}]', "split 'training'"),
        ('[{"image": "v/a.nii.gz", "label": "1"}]', "not a non-negative integer"),
        ('[{"image": "v/a.nii.gz", "label": 1.5}]', "not a non-negative integer"),
        ('[{"image": "v/a.nii.gz", "label": 0}, {"image": "w/a2.nii.gz"}]', "label all or none"),
        ('{"0": "v", "2": "w"}', "must be 0..1"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_manifest(tmp_path, content, expected):
    write_volume(tmp_path / "d" / "v" / "a.nii.gz")
    write_volume(tmp_path / "d" / "w" / "a.nii.gz")
    write_volume(tmp_path / "d" / "w" / "a2.nii.gz")
    (tmp_path / "d" / "empty").mkdir()
    write_volume(tmp_path / "outside.nii.gz")
    m = tmp_path / "d" / "manifest.json"
    m.write_text(content)
    with pytest.raises(DataError, match=expected) as err:
        read_volume_manifest(m)
    assert str(m) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        read_volume_manifest(tmp_path / "none.json")


# ---------------------------------------------------------------------------------------------------- validation


def _truncated(path):
    write_volume(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "channels", "patch", "expected"),
    [
        (lambda p: write_volume(p, data=np.full(SHAPE, np.nan, np.float32)), 1, None, "NaN or infinite"),
        (lambda p: write_volume(p, shape=(*SHAPE, 3)), 1, None, "4D volume 20x24x16x3 where 3D was expected"),
        (lambda p: write_volume(p, shape=(*SHAPE, 3)), 2, None, "has 3 channels"),
        (lambda p: write_volume(p), 2, None, "3D volume 20x24x16 but data.channels=2"),
        (_truncated, 1, None, "unreadable NIfTI"),
        (lambda p: write_volume(p), 1, 18, "patch 18x18x18 larger than volume 20x24x16; lower --data.patch_size"),
        (lambda p: write_volume(p, data=np.zeros((0, 4, 4), np.float32)), 1, None, "empty axis"),
    ],
    ids=["nan", "4d", "channels", "3d-for-2-channels", "truncated-gzip", "patch", "zero-sized"],
)
def test_bad_volumes_fail_with_one_line_naming_the_file(tmp_path, make, channels, patch, expected):
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(DataError, match=expected) as err:
        check_volume(path, channels=channels, patch_size=patch)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_good_volumes_give_their_spatial_shape(tmp_path):
    assert check_volume(write_volume(tmp_path / "a.nii.gz"), patch_size=16) == SHAPE
    assert check_volume(write_volume(tmp_path / "b.nii.gz", shape=(*SHAPE, 1))) == SHAPE  # trailing 1 squeezed
    assert check_volume(write_volume(tmp_path / "c.nii.gz", shape=(*SHAPE, 2)), channels=2) == SHAPE


# ---------------------------------------------------------------------------------------------------- intensities


def test_mri_and_ct_normalisation_map_to_unit_range_and_invert_exactly():
    rng = np.random.default_rng(0)
    mri = np.zeros((10, 12, 8), np.float32)
    mri[2:8, 3:9, 2:6] = rng.uniform(50, 900, (6, 6, 4))
    x, (low, high) = Normalization("mri", percentiles=(1.0, 99.0)).to_unit(mri)
    brain = mri[mri != 0]
    assert (low, high) == pytest.approx(tuple(np.percentile(brain, (1.0, 99.0))))  # background is left out
    assert x.dtype == torch.float32 and x.shape == mri.shape and x.min() == -1 and x.max() == 1
    inside = (mri >= low) & (mri <= high)
    back = Normalization.from_unit(x, low, high).numpy()
    assert np.allclose(back[inside], mri[inside], atol=1e-5 * (high - low))
    assert np.allclose(back[~inside], np.clip(mri[~inside], low, high), atol=1e-5 * (high - low))

    ct = rng.uniform(-1500, 2500, (6, 6, 6)).astype(np.float32)
    y, (low, high) = Normalization("ct", window=(-1000.0, 1000.0)).to_unit(ct)
    assert (low, high) == (-1000.0, 1000.0) and y.min() == -1 and y.max() == 1
    inside = (ct >= -1000) & (ct <= 1000)
    assert np.allclose(Normalization.from_unit(y, low, high).numpy()[inside], ct[inside], atol=1e-3)
    assert Normalization().to_unit(np.full((3, 3, 3), 5.0))[0].eq(-1).all()  # constant: no division by zero


# ---------------------------------------------------------------------------------------------------- augmentation


def test_rot90_turns_like_numpy_and_random_turns_keep_non_square_planes():
    a = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)  # (C, X, Y, Z)
    for k in (1, 2, 3, -1):
        out = Rot90(k, (0, 1))(torch.from_numpy(a))
        assert np.array_equal(out.numpy(), np.rot90(a, k, axes=(1, 2)))
    assert np.array_equal(Rot90(1, (0, 1)).inverse()(Rot90(1, (0, 1))(torch.from_numpy(a))).numpy(), a)
    with pytest.raises(ValueError, match="equal sides"):
        Rot90(1, (1, 2))(torch.from_numpy(a))
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = RandomRot90()(torch.from_numpy(a)).numpy()
        assert out.shape == a.shape  # only the 4x4 plane (axes 0, 1) may turn
        seen.add(next(k for k in range(4) if np.array_equal(out, np.rot90(a, k, axes=(1, 2)))))
    assert seen == {0, 1, 2, 3}


def test_flip_reverses_the_chosen_axes():
    a = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 2, 3, 4, 5)[0]
    assert torch.equal(tio.Flip(axes=(1,))(a), a.flip(2))
    torch.manual_seed(0)
    outs = [tio.RandomFlip(axes=(0, 1, 2))(a) for _ in range(20)]
    assert any(not torch.equal(o, a) for o in outs) and all(o.shape == a.shape for o in outs)


# ---------------------------------------------------------------------------------------------------- splits + module


def test_hashed_split_is_deterministic_disjoint_and_keeps_explicit_splits(tmp_path):
    records = [VolumeRecord(f"case{i}", tmp_path / f"case{i}.nii.gz") for i in range(30)]
    records += [VolumeRecord("t", tmp_path / "t.nii.gz", split="test"),
                VolumeRecord("v", tmp_path / "v.nii", split="val")]
    a, b = assign_splits(records, 0.2), assign_splits(list(reversed(records)), 0.2)
    assert {r.name: r.split for r in a} == {r.name: r.split for r in b}
    splits = {s: {r.name for r in a if r.split == s} for s in ("train", "val", "test")}
    assert splits["test"] == {"t"} and "v" in splits["val"] and 2 <= len(splits["val"]) <= 12
    assert sum(len(s) for s in splits.values()) == len(records)  # every record in exactly one split
    two = assign_splits(records[:2], 0.0)  # at least one val volume, and one left for training
    assert sorted(r.split for r in two) == ["train", "val"]
    with pytest.raises(DataError, match="needs at least 2 volumes or explicit splits"):
        assign_splits(records[:1], 0.2, "m.json")


def test_datamodule_trains_on_patches_validates_on_fixed_ones_and_predicts_whole_volumes(tmp_path):
    m = volumes_dataset(tmp_path, n=4)
    dm = VolumeDataModule(manifest=m, patch_size=8, samples_per_volume=3, queue_length=6, val_patches_per_volume=2,
                          batch_size=2, num_workers=0, val_fraction=0.3)
    dm.setup("fit")
    train = {r.name for r in dm.split_records("train")}
    val = {r.name for r in dm.split_records("val")}
    assert train and val and not train & val and train | val == {f"case{i}" for i in range(4)}
    batches = list(dm.train_dataloader())
    assert len(batches) == (len(train) * 3 + 1) // 2
    for b in batches:
        assert b["image"].shape[1:] == (1, 8, 8, 8) and b["image"].dtype == torch.float32
        assert -1 <= b["image"].min() and b["image"].max() <= 1
    epoch1 = torch.cat([b["image"] for b in dm.val_dataloader()])
    epoch2 = torch.cat([b["image"] for b in dm.val_dataloader()])
    assert epoch1.shape == (len(val) * 2, 1, 8, 8, 8) and torch.equal(epoch1, epoch2)
    assert dm.model_args() == {"image_channels": 1, "image_size": 8, "num_classes": 0, "class_names": None,
                               "output": "image"}

    dm.setup("predict")
    items = list(dm.predict_dataloader())
    assert [b["name"][0] for b in items] == [f"case{i}" for i in range(4)]
    first = items[0]
    assert first["image"].shape == (1, 1, *SHAPE) and first["affine"].dtype == torch.float64
    assert np.array_equal(first["affine"][0].numpy(), nib.load(first["path"][0]).affine)
    raw = np.asarray(nib.load(first["path"][0]).dataobj)
    back = Normalization.from_unit(first["image"][0, 0], float(first["norm_low"]), float(first["norm_high"]))
    inside = (raw >= float(first["norm_low"])) & (raw <= float(first["norm_high"]))
    assert np.allclose(back.numpy()[inside], raw[inside], atol=1e-3)  # same voxel order as the file


def test_labels_reach_batches_and_model_args_and_bad_volumes_stop_setup(tmp_path):
    for label in (0, 1):
        for i in range(2):
            write_volume(tmp_path / f"class{label}" / f"c{label}_{i}.nii.gz", seed=i)
    m = write_manifest(tmp_path / "classes.json", {"0": "class0", "1": "class1"})
    dm = VolumeDataModule(manifest=m, patch_size=8, samples_per_volume=2, queue_length=4, num_workers=0,
                          random_rot90=False)
    assert dm.model_args()["class_names"] == ["0", "1"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
    assert "label" in next(iter(dm.val_dataloader()))
    with pytest.raises(DataError, match=r"c\d_\d.nii.gz: patch 32x32x32 larger than volume 20x24x16"):
        VolumeDataModule(manifest=m, patch_size=32, num_workers=0).setup("fit")
    write_volume(tmp_path / "class1" / "c1_0.nii.gz", data=np.full(SHAPE, np.inf, np.float32))
    with pytest.raises(DataError, match="c1_0.nii.gz: 7680 NaN or infinite"):
        VolumeDataModule(manifest=m, patch_size=8, num_workers=0).setup("predict")


# ---------------------------------------------------------------------------------------------------- demo


def test_mni152_volume_demo_builds_halves_in_place_and_yields_patches(tmp_path):
    dm = MNI152VolumeDataModule(num_workers=0, samples_per_volume=2, queue_length=4, val_patches_per_volume=2)
    assert dm.root.parent == tmp_path / "cache" and dm.model_args()["class_names"] is None
    dm.setup("fit")  # builds the cache without prepare_data having run
    stamp = dm.manifest.stat().st_mtime_ns
    dm.prepare_data()
    assert dm.manifest.stat().st_mtime_ns == stamp
    assert [(r.name, r.split) for r in dm.records()] == [("posterior", "train"), ("anterior", "val")]
    post, ant = (nib.load(dm.root / f"{n}.nii.gz") for n in ("posterior", "anterior"))
    assert post.shape == ant.shape == (98, 58, 94)
    src = nib.load(mni152_files()["t1"])
    t1 = np.asarray(src.dataobj, dtype=np.float32)
    # voxel 0 of `anterior` is output voxel 58 (y) of the whole 2 mm volume: the 2x2x2 block at y=116 of the 1 mm file
    assert np.allclose(ant.affine @ [0, 0, 0, 1], src.affine @ [0.5, 116.5, 0.5, 1])
    assert np.allclose(post.affine @ [0, 0, 0, 1], src.affine @ [0.5, 0.5, 0.5, 1])
    block = t1[60:62, 116:118, 40:42].mean()
    assert np.asarray(ant.dataobj)[30, 0, 20] == pytest.approx(block, rel=1e-5)
    assert (ant.affine @ [0, 0, 0, 1])[1] > (post.affine @ [0, 57, 0, 1])[1]  # anterior lies in front
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 32) and batch["image"].abs().max() <= 1
    assert next(iter(dm.val_dataloader()))["image"].shape == (2, 1, 32, 32, 32)
