"""LightningDataModules for 2D data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset

from medsynth.data.base import SPLITS, MedsynthDataModule
from medsynth.data.image2d import (
    ImageRecord,
    IndexDataset,
    SegGuidedImageDataset,
    check_distinct,
    scan_reference_layout,
    validate_records,
)
from medsynth.data.manifest import read_manifest
from medsynth.errors import DataError


def check_positive_options(least: int = 1, **options: int) -> None:
    """Refuse a count below ``least`` (the CLI's types already do; this guards direct construction).

    Raises:
        DataError: ``data.NAME=VALUE: must be at least LEAST``.
    """
    for name, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise DataError(f"data.{name}={value!r}: must be an integer >= {least}")


def check_intensity_range(intensity_range) -> None:
    """Refuse an intensity range that is not two finite numbers, low < high (a reversed or empty one would map every
    image to a constant).

    Raises:
        DataError: naming ``data.intensity_range`` and its value.
    """
    if intensity_range is None:
        return
    values = list(intensity_range)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise DataError(f"data.intensity_range={values}: give two finite numbers [low, high]")
    if not values[0] < values[1]:
        raise DataError(f"data.intensity_range={values}: low must be below high (stored values mapped to -1 and 1)")


class SegGuidedImageDataModule(MedsynthDataModule):
    """2D images with integer segmentation masks (or none, for unconditional models).

    Data comes either from the reference folder layout (``img_dir`` + ``seg_dir``) or from a JSON ``manifest``.
    Every file of the splits a stage uses is read and checked before the stage starts. Training and validation
    use ``train`` and ``val``; prediction samples one image per mask of ``predict_split`` (masks alone suffice),
    or ``num_samples`` images when the model is unconditional (``num_classes=0``).

    Args:
        img_dir: image root holding ``train/``, ``val/`` and ``test/`` with ``.png``/``.npy`` files.
        seg_dir: mask root holding ``<seg_type>/{train,val,test}/`` with files named like their images.
        seg_type: the folder under ``seg_dir`` that holds the mask set to use.
        manifest: JSON manifest of records, used instead of ``img_dir``/``seg_dir``.
        num_classes: mask classes counting background (labels ``0..num_classes-1``); 0 means unconditional
            (masks are ignored).
        image_size: side in pixels of the square that images and masks are resized to.
        channels: image channels (1 grey, 3 RGB, or any count with ``.npy``).
        intensity_range: stored ``(low, high)`` values mapped to [-1, 1]; by default 8/16-bit images use their
            full range and float images are min-max scaled per image.
        batch_size: examples per batch (per device).
        num_workers: DataLoader worker processes.
        random_flip: flip training images and masks left-right at random.
        predict_split: the split whose masks condition sampling (``all``: every split present, e.g. to encode
            the whole dataset with an autoencoder).
        num_samples: how many images ``predict`` samples for an unconditional model.
        predict_images: ``predict`` reads the images of ``predict_split`` (with their masks when
            ``num_classes > 0``) instead of masks alone: what an autoencoder reconstructs or encodes.
    """

    model_describing_args = ("num_classes", "channels", "image_size", "intensity_range")
    data_location_args = ("img_dir", "seg_dir", "manifest")

    def __init__(
        self,
        img_dir: Optional[Path] = None,
        seg_dir: Optional[Path] = None,
        seg_type: str = "all",
        manifest: Optional[Path] = None,
        num_classes: NonNegativeInt = 0,
        image_size: PositiveInt = 64,
        channels: PositiveInt = 1,
        intensity_range: Optional[tuple[float, float]] = None,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        random_flip: bool = True,
        predict_split: Literal["train", "val", "test", "all"] = "test",
        num_samples: PositiveInt = 16,
        predict_images: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 0 or num_classes == 1:
            raise DataError(f"data.num_classes={num_classes}: use 0 (unconditional) or >= 2 (counting background)")
        if image_size < 8:
            raise DataError(f"data.image_size={image_size} is too small")
        check_positive_options(batch_size=batch_size, channels=channels, num_samples=num_samples)
        check_positive_options(least=0, num_workers=num_workers)
        check_intensity_range(intensity_range)
        self.save_hyperparameters(logger=False)  # logged under "data" by the CLI (cli.LogDataSettings)
        self.img_dir = Path(img_dir) if img_dir is not None else None
        self.seg_dir = Path(seg_dir) if seg_dir is not None else None
        self.seg_type = seg_type
        self.manifest = Path(manifest) if manifest is not None else None
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.intensity_range = intensity_range
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.predict_split = predict_split
        self.num_samples = num_samples
        self.predict_images = predict_images

    def model_args(self) -> dict:
        """What the model must know about this data (linked into the model's arguments by the CLI)."""
        return {"num_classes": self.num_classes, "image_channels": self.channels, "image_size": self.image_size,
                "class_names": None, "output": "image"}

    @property
    def conditional(self) -> bool:
        """Whether examples carry masks."""
        return self.num_classes > 0

    def records(self, split: str, need_images: bool = True) -> list[ImageRecord]:
        """The checked records of one split (every file read once)."""
        if self.manifest is not None:
            records = [r for r in read_manifest(self.manifest) if r.split == split]
            if not records:
                raise DataError(f"{self.manifest}: empty split '{split}': no records")
            for r in records:
                for kind, file in (("image", r.image), ("mask", r.mask)):
                    if file is not None and not file.exists():
                        raise DataError(f"{self.manifest}: record '{r.name}' ({split}) names {kind} {file}, which "
                                        "does not exist")
                if need_images and r.image is None:
                    raise DataError(f"{self.manifest}: record '{r.name}' in split '{split}' has no image")
                if self.conditional and r.mask is None:
                    raise DataError(f"{self.manifest}: record '{r.name}' in split '{split}' has no mask")
            if not self.conditional:
                records = [ImageRecord(r.name, r.image, split=r.split) for r in records]
        else:
            seg_dir = self.seg_dir if self.conditional else None
            if self.conditional and seg_dir is None:
                raise DataError(f"data.seg_dir is not set but data.num_classes={self.num_classes} asks for masks")
            records = scan_reference_layout(split, self.img_dir, seg_dir, self.seg_type, need_images=need_images)
        check_distinct(records)
        if not need_images:
            records = [ImageRecord(r.name, split=r.split, mask=r.mask) for r in records]
        validate_records(records, self.channels, max(self.num_classes, 1), self.intensity_range)
        return records

    def _dataset(self, split: str, need_images: bool = True, random_flip: bool = False) -> SegGuidedImageDataset:
        return SegGuidedImageDataset(
            self.records(split, need_images),
            image_size=self.image_size,
            channels=self.channels,
            num_classes=max(self.num_classes, 1),
            random_flip=random_flip,
            intensity_range=self.intensity_range,
        )

    def _present_splits(self) -> list[str]:
        if self.manifest is not None:
            present = {r.split for r in read_manifest(self.manifest)}
        else:
            root = self.img_dir if self.predict_images or not self.conditional else self.seg_dir / self.seg_type
            present = {s for s in SPLITS if root is not None and (Path(root) / s).is_dir()}
        return [s for s in SPLITS if s in present]

    def _predict_dataset(self) -> SegGuidedImageDataset:
        """The predict split's masks (and images with ``predict_images``); ``all`` joins every split present."""
        if self.predict_split != "all":
            return self._dataset(self.predict_split, need_images=self.predict_images)
        records = [r for split in self._present_splits() for r in self.records(split, self.predict_images)]
        check_distinct(records)
        return SegGuidedImageDataset(records, image_size=self.image_size, channels=self.channels,
                                     num_classes=max(self.num_classes, 1), intensity_range=self.intensity_range)

    def dataset(self, split: str) -> Dataset:
        if split != "predict":
            return self._dataset(split, random_flip=self.random_flip and split == "train")
        if not (self.conditional or self.predict_images):
            return IndexDataset(self.num_samples)
        ds = self._predict_dataset()
        stems = [Path(r.name).stem for r in ds.records]  # outputs are named by stem
        dupes = sorted({n for n in stems if stems.count(n) > 1})
        if dupes:
            raise DataError(f"split '{self.predict_split}': several masks are named {dupes[0]}.*; names must be unique")
        return ds

    def check_stage(self, stage: str) -> None:
        if stage == "fit":  # one file in both splits
            check_distinct(self.datasets["train"].records + self.datasets["val"].records)
