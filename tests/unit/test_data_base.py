"""The one datamodule base: split rule, manifest path guard, stage set-up and loader rules."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from medsynth.data.base import MedsynthDataModule, resolve_listed_path, split_by_name
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
