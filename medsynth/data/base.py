"""What every medsynth datamodule shares: the splits, the split rule, the manifest path guard, the record of one
example and the map of intensities onto [-1, 1] (2D and 3D alike), and the loaders.

A datamodule subclasses :class:`MedsynthDataModule` and writes two methods: :meth:`~MedsynthDataModule.dataset`
(the checked dataset of one split: ``train``, ``val``, ``test`` or ``predict``) and
:meth:`~MedsynthDataModule.model_args` (what the model must know about the data). Setting up a stage, the loaders
and their shuffle / drop-last / worker rules live here once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medsynth.errors import DataError

SPLITS = ("train", "val", "test")
"""The data splits, in order."""

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
"""The datasets each Trainer stage sets up."""


@dataclass(frozen=True)
class Record:
    """One example of 2D or 3D data: an image or volume and/or its integer mask, its class label and its split.

    Attributes:
        name: what identifies the example, unique in a manifest: 2D, the image's file name (the mask's when there
            is no image); 3D, the volume's file name without its suffix (a DICOM series: its folder's name).
        image: absolute path of the image, volume file or DICOM series folder; ``None`` for a mask-only record
            (sampling on test masks).
        label: integer class label (>= 0), or ``None`` for unlabelled data.
        split: ``train``, ``val`` or ``test``; ``None`` leaves it to a hash of the name (:func:`split_by_name`).
        mask: path of the integer mask (2D) or label map (3D), or ``None``.
    """

    name: str
    image: Optional[Path] = None
    label: Optional[int] = None
    split: Optional[str] = None
    mask: Optional[Path] = None


def scale_to_unit(array: Union[np.ndarray, torch.Tensor], low: float, high: float) -> torch.Tensor:
    """Clip intensities to ``[low, high]`` and map that range linearly onto [-1, 1]: float32, same shape, any
    number of spatial dimensions (computed in float64). Needs ``high > low``."""
    x = array.double() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array, dtype=np.float64))
    return ((x.clamp(low, high) - low) * (2.0 / (high - low)) - 1.0).float()


def name_fraction(name: str) -> float:
    """A stable number in [0, 1) from a name alone (SHA-1): the same on every machine, run and Python."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16) / 16**12


def split_by_name(name: str, val_fraction: float) -> str:
    """``val`` for about ``val_fraction`` of all names, ``train`` for the rest; fixed by the name alone, so adding
    files never moves another file between splits."""
    return "val" if name_fraction(name) < val_fraction else "train"


def resolve_listed_path(listing: Path, rel: object, where: str) -> Path:
    """The absolute path of a file named in ``listing`` (a manifest or class map): absolute paths as given,
    relative ones against the listing's folder, which they must not leave.

    The check is lexical, so a symlink the user placed inside the folder is followed.

    Raises:
        DataError: the path is not a non-empty string, or leaves the folder (``where`` says which record).
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{listing}: {where} path {rel!r} is not a non-empty string")
    p = Path(rel)
    if p.is_absolute():
        return p
    root = Path(os.path.abspath(Path(listing).parent))
    full = Path(os.path.normpath(root / p))
    if not full.is_relative_to(root):
        raise DataError(f"{listing}: {where} path '{rel}' leaves the manifest's folder; use an absolute path")
    return full


class MedsynthDataModule(L.LightningDataModule):
    """The base of medsynth's datamodules: datasets per split, set up per stage, and one loader factory.

    Subclasses set ``batch_size`` and ``num_workers`` (their constructor arguments) and implement
    :meth:`dataset` and :meth:`model_args`; they may override :meth:`check_stage` (checks across the datasets of
    a stage), :meth:`collate_fn`, :meth:`loader_options` and :attr:`persistent_splits`, and declare which of their
    arguments a checkpoint supplies (:attr:`model_describing_args`, :attr:`data_location_args`).
    """

    persistent_splits: tuple[str, ...] = ("train", "val")
    """Splits whose loader workers stay alive between epochs (those iterated again and again)."""

    model_describing_args: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that describe the data a model was shaped by (class count, channels, size, intensity
    scaling): ``predict``, ``validate``, ``test`` and ``export`` with ``--ckpt_path`` take them from the checkpoint
    over the command line (and say which they replaced), also when the checkpoint was trained on another
    datamodule class that has them (the 3D demo's model on a user's volumes). See
    :class:`~medsynth.contracts.DeclaresDataArgs`."""

    data_location_args: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that say where the data lives: taken from a checkpoint of the same datamodule class
    only when the command line leaves them unset."""

    batch_size: int
    num_workers: int

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def model_args(self) -> dict:
        """What the model must know about this data (``num_classes``, ``image_channels``, ``image_size``, ...),
        linked into the model's arguments of the same names by the CLI."""
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        """The checked dataset of ``split`` (``train``, ``val``, ``test`` or ``predict``).

        Raises:
            DataError: one line naming the file or option at fault.
        """
        raise NotImplementedError

    def check_stage(self, stage: str) -> None:
        """Checks across the datasets of a stage once all are built (e.g. no file in two splits)."""

    def setup(self, stage: str) -> None:
        for split in STAGE_SPLITS[stage]:
            self.datasets[split] = self.dataset(split)
        self.check_stage(stage)

    def collate_fn(self, split: str) -> Optional[Callable]:
        """How the loader of ``split`` joins items into a batch (``None``: PyTorch's default)."""
        return None

    def loader_options(self, split: str) -> dict:
        """The DataLoader arguments of ``split``: training shuffles and drops a last partial batch (when there is
        more than one batch), the others keep order and every item. Batch size by keyword, as Lightning needs to
        re-create loaders."""
        train = split == "train"
        return {
            "batch_size": self.batch_size,
            "shuffle": train,
            "drop_last": train and len(self.datasets[split]) > self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0 and split in self.persistent_splits,
            "collate_fn": self.collate_fn(split),
        }

    def loader(self, split: str) -> DataLoader:
        """The DataLoader of ``split`` (see :meth:`loader_options`)."""
        return DataLoader(self.datasets[split], **self.loader_options(split))

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
