"""Class-labelled 2D images: JSON class maps and folder-per-class layouts.

Two layouts, each giving class names in label order:

* a JSON class map (the 3D MedDiffusion style), paths relative to the file::

      {"0": "dir_of_class_0", "1": "dir_of_class_1"}      # integer keys 0..N-1; names are the folder names
      {"axial": "slices/axial", "coronal": "slices/cor"}  # name keys; labels follow the file's order

  Each folder holds images directly (then a deterministic 10 % of them, by file name, is the validation split)
  or ``train/``, ``val/`` and ``test/`` subfolders.
* folders per class: ``ROOT/{train,val}/<class_name>/*.png|.npy`` (class names sorted).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset

from medsynth.data.base import SPLITS, MedsynthDataModule, split_by_name
from medsynth.data.datamodules import check_intensity_range, check_positive_options
from medsynth.data.image2d import (
    ImageRecord,
    check_distinct,
    list_image_files,
    read_image,
    resize_image,
    to_unit_range,
)
from medsynth.data.manifest import load_json
from medsynth.errors import DataError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_name(name: str, source: Path) -> str:
    if not SAFE_NAME.match(name):
        raise DataError(f"{source}: class name {name!r} cannot be a folder name (letters, digits, _ . + - only)")
    return name


def read_class_map(path: Path) -> tuple[list[str], list[Path]]:
    """Class names (label order) and their folders from a JSON class map.

    Raises:
        DataError: unreadable map or a repeated key, label keys that are not exactly ``0..N-1`` (written plainly:
            ``"1"``, not ``"01"``), label and name keys mixed, a missing folder, two classes on one folder, an
            unsafe class name.
    """
    path = Path(path)
    raw = load_json(path, "class map")
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, str) and v for v in raw.values()):
        raise DataError(f"{path}: class map must be a non-empty object mapping label or name -> folder")
    keys = list(raw)
    numeric = [k for k in keys if k.strip().lstrip("+-").isdigit()]
    if numeric and len(numeric) < len(keys):
        raise DataError(f"{path}: keys mix labels ('{numeric[0]}') and names; use labels 0..N-1 or names only")
    if numeric:
        expected = [str(i) for i in range(len(keys))]
        if sorted(keys, key=lambda k: (len(k), k)) != expected:
            odd = next(k for k in keys if k not in expected)
            raise DataError(f"{path}: label {odd} is outside the class map; labels must be 0..{len(keys) - 1}, "
                            "each once, written plainly")
        folders = [path.parent / raw[k] for k in expected]
        names = [f.name for f in folders]
    else:
        folders = [path.parent / raw[k] for k in keys]
        names = keys
    for name, folder in zip(names, folders):
        _check_name(name, path)
        if not folder.is_dir():
            raise DataError(f"{path}: class '{name}' names a missing folder {folder}")
    real = [os.path.realpath(f) for f in folders]
    for i, r in enumerate(real):
        if r in real[:i]:
            j = real.index(r)
            raise DataError(f"{path}: classes '{names[j]}' and '{names[i]}' share the folder {folders[i]}; each "
                            "class needs its own")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: two classes share a name; name the classes with keys instead of labels")
    return names, folders


VAL_FRACTION = 0.1
"""Share of a class-map folder without split subfolders that validates (chosen by file name)."""


def class_map_files(folder: Path, split: str) -> list[Path]:
    """A class-map folder's files of one split: its ``<split>/`` subfolder, else the hashed 90/10 split.

    Raises:
        DataError: a file or folder that would not be read (see :func:`list_image_files`).
    """
    if (folder / "train").is_dir():
        list_image_files(folder, suffixes=(), allow_folders=SPLITS)  # nothing loose beside train/ val/ test/
        return list_image_files(folder / split)
    return [f for f in list_image_files(folder) if split_by_name(f.name, VAL_FRACTION) == split] if split != "test" else []


class LabelledImageDataset(Dataset):
    """Images with class labels: items ``image`` ``(C, S, S)`` in [-1, 1], ``label``, ``name``, ``split``,
    ``index`` (encoded latents keep their split)."""

    def __init__(self, items, image_size: int, channels: int, random_flip: bool = False, intensity_range=None):
        self.items = list(items)
        self.image_size, self.channels = image_size, channels
        self.random_flip, self.intensity_range = random_flip, intensity_range

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rec, label = self.items[index]
        x = resize_image(torch.from_numpy(to_unit_range(read_image(rec.image, self.channels), self.intensity_range)),
                         self.image_size)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "label": label, "name": rec.name, "split": rec.split, "index": index}


class ClassSampleDataset(Dataset):
    """The inputs of class-conditional sampling: ``per_class`` items of each label, written to ``<class_name>/``."""

    def __init__(self, class_names: list[str], per_class: int) -> None:
        self.class_names, self.per_class = class_names, per_class

    def __len__(self) -> int:
        return len(self.class_names) * self.per_class

    def __getitem__(self, index: int) -> dict:
        label, i = divmod(index, self.per_class)
        return {"label": label, "index": index, "name": f"sample_{i:05d}.png", "folder": self.class_names[label]}


class ClassImageDataModule(MedsynthDataModule):
    """2D images with class labels (modality, body region, pathology, ...), for class-conditional models.

    Args:
        manifest: JSON class map (see the module docstring).
        root: folder-per-class root holding ``train/<class>/`` and ``val/<class>/``; used instead of ``manifest``.
        image_size: side in pixels of the square images are resized to.
        channels: image channels.
        intensity_range: stored ``(low, high)`` mapped to [-1, 1] (default: by dtype, see ``to_unit_range``).
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        random_flip: flip training images left-right at random.
        samples_per_class: images ``predict`` samples of each class.
        predict_images: ``predict`` yields the real images of every split with their labels instead (to encode
            them with an autoencoder for 2D latent diffusion, ``configs/encode2d.yaml``); each is named
            ``<class_name>_<split>_<file stem>``.
    """

    model_describing_args = ("channels", "image_size", "intensity_range")
    data_location_args = ("manifest",)

    def __init__(
        self,
        manifest: Optional[Path] = None,
        root: Optional[Path] = None,
        image_size: PositiveInt = 64,
        channels: PositiveInt = 1,
        intensity_range: Optional[tuple[float, float]] = None,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        random_flip: bool = False,
        samples_per_class: PositiveInt = 8,
        predict_images: bool = False,
    ) -> None:
        super().__init__()
        if (manifest is None) == (root is None):
            raise DataError("give exactly one of data.manifest (a JSON class map) and data.root (folders per class)")
        check_positive_options(image_size=image_size, channels=channels, batch_size=batch_size,
                               samples_per_class=samples_per_class)
        check_positive_options(least=0, num_workers=num_workers)
        check_intensity_range(intensity_range)
        self.save_hyperparameters(logger=False)  # logged under "data" by the CLI (cli.LogDataSettings)
        self.manifest = Path(manifest) if manifest is not None else None
        self.root = Path(root) if root is not None else None
        self.image_size, self.channels, self.intensity_range = image_size, channels, intensity_range
        self.batch_size, self.num_workers, self.random_flip = batch_size, num_workers, random_flip
        self.samples_per_class, self.predict_images = samples_per_class, predict_images
        self.class_names, self.folders = self._classes()

    def model_args(self) -> dict:
        """What the model must know about this data (linked into the model's arguments by the CLI)."""
        return {"num_classes": 0, "image_channels": self.channels, "image_size": self.image_size,
                "class_names": self.class_names, "output": "image"}

    def _classes(self) -> tuple[list[str], list[Path]]:
        if self.manifest is not None:
            return read_class_map(self.manifest)
        train = self.root / "train"
        folders = (sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
                   if train.is_dir() else [])
        if train.is_dir():  # a loose file beside the class folders would be skipped without a word
            list_image_files(train, suffixes=(), allow_folders=[f.name for f in folders])
        if not folders:
            raise DataError(f"{train}: no class folders (expected {train}/<class_name>/ with images)")
        return [_check_name(f.name, self.root) for f in folders], folders

    def _class_files(self, label: int, split: str) -> list[Path]:
        if self.manifest is not None:
            return class_map_files(self.folders[label], split)
        return list_image_files(self.root / split / self.class_names[label])

    def _items(self, split: str) -> list[tuple[ImageRecord, int]]:
        """(record, label) pairs of one split, every file read once to fail fast with one line naming it."""
        items = []
        for label, name in enumerate(self.class_names):
            files = self._class_files(label, split)
            if not files and split == "train":
                folder = self.folders[label] if self.manifest is not None else self.root / split / name
                raise DataError(f"{folder}: empty class folder (class '{name}' has no .png or .npy images)")
            items += [(ImageRecord(f"{name}/{f.name}", f, split=split), label) for f in files]
        if not items:
            raise DataError(f"{self.manifest or self.root / split}: empty split '{split}': no images in any class")
        for rec, _ in items:
            read_image(rec.image, self.channels)
        check_distinct([rec for rec, _ in items])  # one image in two classes
        return items

    def dataset(self, split: str) -> Dataset:
        if split == "predict":
            return (self._real_images() if self.predict_images
                    else ClassSampleDataset(self.class_names, self.samples_per_class))
        # test: the judge's real-image ceiling, which needs test/ folders
        return LabelledImageDataset(self._items(split), self.image_size, self.channels,
                                    self.random_flip and split == "train", self.intensity_range)

    def check_stage(self, stage: str) -> None:
        if stage == "fit":  # one image in both splits
            check_distinct([rec for ds in (self.datasets["train"], self.datasets["val"]) for rec, _ in ds.items])

    def _real_images(self) -> LabelledImageDataset:
        """Every real image of every split, labelled and named ``<class>_<split>_<stem>`` (for encoding)."""
        items, seen = [], {}
        for split in ("train", "val", "test"):
            if split != "train" and not any(self._class_files(k, split) for k in range(len(self.class_names))):
                continue  # no val/test images: nothing to encode there
            for rec, label in self._items(split):
                name = f"{self.class_names[label]}_{split}_{Path(rec.image).stem}"
                if name in seen:
                    raise DataError(f"{rec.image}: named like {seen[name]} once encoded ({name}); keep one of "
                                    "NAME.png and NAME.npy")
                seen[name] = rec.image
                items.append((ImageRecord(f"{name}{Path(rec.image).suffix}", rec.image, split=split), label))
        return LabelledImageDataset(items, self.image_size, self.channels, False, self.intensity_range)
