"""The one datamodule base: split rule, manifest path guard, one record and intensity map for 2D and 3D, stage
set-up, loader rules, and the arguments a checkpoint supplies."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

import medsynth.cli as cli
import medsynth.data  # noqa: F401 - every shipped datamodule class, for the declarations test
from medsynth.data.base import MedsynthDataModule, Record, resolve_listed_path, scale_to_unit, split_by_name
from medsynth.data.image2d import ImageRecord, to_unit_range
from medsynth.data.volumes import Normalization, VolumeRecord
from medsynth.errors import DataError


def test_split_by_name_is_stable_and_near_its_fraction():
    names = [f"case_{i:04d}.png" for i in range(2000)]
    splits = [split_by_name(n, 0.2) for n in names]
    assert splits == [split_by_name(n, 0.2) for n in names]  # the name alone decides
    assert 0.17 < splits.count("val") / len(names) < 0.23
    assert all(split_by_name(n, 0.0) == "train" for n in names[:50])
    # a larger fraction only moves names from train to val, never back
    wider = [split_by_name(n, 0.3) for n in names]
    assert all(w == "val" for s, w in zip(splits, wider) if s == "val")


def test_resolve_listed_path_keeps_relative_paths_inside_the_listing_folder(tmp_path):
    listing = tmp_path / "data" / "manifest.json"
    assert resolve_listed_path(listing, "a/b.png", "record 0") == tmp_path / "data" / "a" / "b.png"
    assert resolve_listed_path(listing, "/abs/c.png", "record 1") == Path("/abs/c.png")
    with pytest.raises(DataError, match=r"manifest.json: record 2 path '\.\./x.png' leaves the manifest's folder"):
        resolve_listed_path(listing, "../x.png", "record 2")
    with pytest.raises(DataError, match="record 3 path 7 is not a non-empty string"):
        resolve_listed_path(listing, 7, "record 3")


class Numbers(MedsynthDataModule):
    def __init__(self, n=10, batch_size=4):
        super().__init__()
        self.n, self.batch_size, self.num_workers = n, batch_size, 0
        self.checked = []

    def model_args(self):
        return {"image_size": 1}

    def dataset(self, split):
        return TensorDataset(torch.arange(self.n if split == "train" else 3))

    def check_stage(self, stage):
        self.checked.append((stage, sorted(self.datasets)))


def test_stages_set_up_their_splits_and_loaders_follow_one_rule():
    dm = Numbers()
    dm.setup("fit")
    assert dm.checked == [("fit", ["train", "val"])]
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last  # 10 items > batch 4: no ragged last batch
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert [b[0].tolist() for b in val] == [[0, 1, 2]]
    dm.setup("predict")
    assert [len(b[0]) for b in dm.predict_dataloader()] == [3]
    small = Numbers(n=3)
    small.setup("fit")
    assert not small.train_dataloader().drop_last  # one partial batch is all there is: keep it


class Sized(Numbers):
    """A datamodule whose size describes the data the model was shaped by and whose folder says where it lives."""

    model_describing_args = ("size",)
    data_location_args = ("folder",)

    def __init__(self, size=8, folder=None, colour="red", batch_size=4):
        super().__init__(batch_size=batch_size)


def test_every_declared_checkpoint_argument_is_a_constructor_argument():
    def subclasses(cls):
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    shipped = [c for c in subclasses(MedsynthDataModule) if c.__module__.startswith("medsynth.")]
    assert len(shipped) >= 9
    for cls in shipped:
        params = inspect.signature(cls.__init__).parameters
        declared = (*cls.model_describing_args, *cls.data_location_args)
        assert all(name in params for name in declared), (cls.__name__, declared)
        assert not set(cls.model_describing_args) & set(cls.data_location_args), cls.__name__


@pytest.mark.parametrize("same_class", [True, False])
def test_a_checkpoint_supplies_what_the_datamodule_class_declares(tmp_path, monkeypatch, same_class):
    saved_class = f"{Sized.__module__}.Sized" if same_class else f"{Numbers.__module__}.Numbers"
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "medsynth.modules.DiffusionModule"},
                "datamodule_hyper_parameters": {"_class_path": saved_class, "size": 16, "folder": "/saved/data",
                                                "colour": "green", "batch_size": 2}}, ckpt)
    warnings = []
    monkeypatch.setattr(cli.log, "warning", warnings.append)
    for given_folder in (None, "/given/data"):
        init = {"size": 4, "folder": given_folder, "colour": "blue", "batch_size": 4}
        config = {"predict": {"data": {"class_path": f"{Sized.__module__}.Sized", "init_args": init}}}
        cli.MedsynthCLI._apply_checkpoint_data(SimpleNamespace(config=config), "predict", str(ckpt))
        # declared as describing the data: the checkpoint's value, whichever class saved it; undeclared: the user's
        assert init["size"] == 16 and init["colour"] == "blue" and init["batch_size"] == 4
        # a location: the checkpoint's only where unset, and only from the same class
        assert init["folder"] == (given_folder or ("/saved/data" if same_class else None))
    assert len(warnings) == 2 and "data.size=4 (checkpoint: 16)" in warnings[0]


def test_2d_and_3d_share_one_record_and_one_intensity_map():
    assert ImageRecord is VolumeRecord is Record
    # positional fields as volumes always had them; 2D code names split and mask
    assert VolumeRecord("a", Path("a.nii"), 1, "val") == Record(name="a", image=Path("a.nii"), label=1, split="val")
    values = np.array([-1200.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0], np.float32)
    image = values.reshape(1, 2, 3)  # (C, H, W)
    volume = values.reshape(1, 1, 2, 3)  # (C, X, Y, Z)
    expected = np.array([-1.0, -1.0, 0.0, 0.5, 1.0, 1.0], np.float32)
    window = Normalization("ct", window=(-1000.0, 1000.0))
    np.testing.assert_array_equal(to_unit_range(image, (-1000, 1000)).ravel(), expected)
    np.testing.assert_array_equal(window.to_unit(volume)[0].numpy().ravel(), expected)
    np.testing.assert_array_equal(scale_to_unit(torch.from_numpy(volume), -1000, 1000).numpy().ravel(), expected)
