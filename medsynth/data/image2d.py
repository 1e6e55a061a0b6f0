"""2D images and integer masks on disk: discovery in the reference layout, reading, validation, and the Dataset.

The reference layout (from the segmentation-guided diffusion project) is::

    IMG_DIR/{train,val,test}/NAME.png|.npy|.jpg|.tif|.bmp
    SEG_DIR/<seg_type>/{train,val,test}/NAME.png|.npy|.tif|.bmp   # same stem, lossless integer classes 0..K-1

Every problem with a file is reported as one :class:`~medsynth.errors.DataError` line naming that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medsynth.data.base import Record, scale_to_unit
from medsynth.errors import DataError
from medsynth.io import read_image_file

IMAGE_SUFFIXES = (".png", ".npy", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Image files read from a folder: Pillow's grey/RGB 8/16-bit formats and ``.npy`` arrays."""
MASK_SUFFIXES = (".png", ".npy", ".tif", ".tiff", ".bmp")
"""Mask files read from a folder: lossless formats only (a JPEG alters labels)."""


ImageRecord = Record
"""One 2D example: an image and/or its mask, and its split (the one record type of 2D and 3D data,
:class:`~medsynth.data.base.Record`)."""


def list_image_files(folder: Path, what: str = "image", suffixes: Sequence[str] = IMAGE_SUFFIXES,
                     allow_folders: Sequence[str] = ()) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; ``[]`` when the folder does not exist.

    Nothing is skipped silently: an entry that is not a readable file with one of ``suffixes`` (another format, a
    sub-folder, a second file of the same name with another suffix) is refused, so a run never trains on part of
    the data. Hidden entries (``.DS_Store``, ``._x.png``) are ignored.

    Args:
        folder: the folder to list.
        what: ``image`` or ``mask``, for messages.
        suffixes: accepted suffixes (lower case).
        allow_folders: names of sub-folders that may be there (e.g. ``train``, ``val``, ``test``).

    Raises:
        DataError: an unexpected entry, or two files of one name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files, stems = [], {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name in allow_folders and p.is_dir():
            continue
        if p.is_dir():
            raise DataError(f"{p}: unexpected folder among the {what}s of {folder} (files are read from "
                            f"{folder} itself, not from sub-folders); move it out")
        if not suffixes:
            raise DataError(f"{p}: unexpected file in {folder} (only its folders {', '.join(allow_folders)} are "
                            "read); move it out")
        if p.suffix.lower() not in suffixes:
            lossy = " (lossy: it alters labels)" if what == "mask" and p.suffix.lower() in (".jpg", ".jpeg") else ""
            raise DataError(f"{p}: {what} folder holds a file medsynth does not read{lossy}; {what}s must be "
                            f"{', '.join(suffixes)}: convert it or move it out")
        if p.stem in stems:
            raise DataError(f"{p}: named like {stems[p.stem]} (one name, two files); keep one")
        stems[p.stem] = p
        files.append(p)
    return files


def find_partner(folder: Path, name: str) -> Optional[Path]:
    """The file called ``name`` in ``folder``, or one with the same stem and another accepted mask suffix."""
    exact = folder / name
    if exact.is_file():
        return exact
    stem = Path(name).stem
    for suffix in MASK_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def scan_reference_layout(
    split: str, img_dir: Optional[Path], seg_dir: Optional[Path], seg_type: str, need_images: bool = True
) -> list[ImageRecord]:
    """Records of one split of the reference layout.

    Args:
        split: ``train``, ``val`` or ``test``.
        img_dir: root of the images (holds ``train/``, ``val/``, ``test/``); ``None`` for mask-only records.
        seg_dir: root of the masks (holds ``<seg_type>/<split>/``); ``None`` for unconditional data.
        seg_type: the mask set's folder name under ``seg_dir``.
        need_images: when False and ``seg_dir`` is given, the masks alone define the records (sampling).

    Raises:
        DataError: an image without its partner mask, a mask without its image, a file of a kind that is not read,
            or a split with no files.
    """
    mask_folder = Path(seg_dir) / seg_type / split if seg_dir is not None else None
    masks = list_image_files(mask_folder, "mask", MASK_SUFFIXES) if mask_folder is not None else []
    if need_images or seg_dir is None:
        if img_dir is None:
            raise DataError("data.img_dir is not set: give the folder that holds train/, val/ and test/")
        folder = Path(img_dir) / split
        files = list_image_files(folder)
        if not files:
            raise DataError(f"{folder}: empty split '{split}': no images found ({', '.join(IMAGE_SUFFIXES)})")
        by_stem = {m.stem: m for m in masks}
        records = []
        for image in files:
            mask = None
            if mask_folder is not None:
                mask = by_stem.pop(image.stem, None)
                if mask is None:
                    raise DataError(f"{image}: missing partner mask {mask_folder / image.name}")
            records.append(ImageRecord(name=image.name, split=split, image=image, mask=mask))
        if by_stem:  # a mask whose image is gone would be dropped without a word
            orphan = next(iter(by_stem.values()))
            raise DataError(f"{orphan}: mask without its image (no {folder / orphan.stem}.* image)")
        return records
    if not masks:
        raise DataError(f"{mask_folder}: empty split '{split}': no masks found ({', '.join(MASK_SUFFIXES)})")
    return [ImageRecord(name=m.name, split=split, mask=m) for m in masks]


def read_image(path: Path, channels: int) -> np.ndarray:
    """Read an image as ``(C, H, W)`` with its stored dtype.

    Pillow files (grey, RGB or RGBA, 8 or 16 bits; see :func:`medsynth.io.read_image_file`) or ``.npy`` arrays
    ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``; for arrays the expected ``channels`` decides between the last two.

    Raises:
        DataError: unreadable file, wrong number of dimensions or channels, NaN or infinite values.
    """
    path = Path(path)
    arr = read_image_file(path, "image")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if path.suffix.lower() != ".npy" or (arr.shape[-1] == channels and arr.shape[0] != channels):
            arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"{path}: image has shape {tuple(arr.shape)}; expected (H, W), (H, W, C) or (C, H, W)")
    if arr.shape[0] != channels:
        raise DataError(f"{path}: image has {arr.shape[0]} channels, expected {channels} (data.channels)")
    if 0 in arr.shape[1:]:
        raise DataError(f"{path}: image is empty (size {arr.shape[2]}x{arr.shape[1]})")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: image has unsupported dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    return arr


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """Read an integer mask as ``(H, W)`` int64 with values in ``0..num_classes-1``.

    Masks are lossless label maps: PNG/TIFF/BMP with one integer channel (palette indices count) or ``.npy``.

    Raises:
        DataError: unreadable or lossy file, more than one channel, non-integer values, or a label >=
            ``num_classes``.
    """
    path = Path(path)
    arr = read_image_file(path, "mask", label_map=True)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: mask has shape {tuple(arr.shape)}; expected a single-channel (H, W) label map")
    if arr.size == 0:
        raise DataError(f"{path}: mask is empty (size {arr.shape[1]}x{arr.shape[0]})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{path}: mask holds non-integer values; expected class indices 0..{num_classes - 1}")
    elif arr.dtype.kind not in "biu":
        raise DataError(f"{path}: mask has unsupported dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.abs(arr).max() > 2**31:
        raise DataError(f"{path}: mask holds values beyond any class index")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise DataError(f"{path}: mask holds negative label {lo}")
    if hi >= num_classes:
        raise DataError(f"{path}: mask holds label {hi} >= data.num_classes={num_classes} (classes count background)")
    return arr


def to_unit_range(arr: np.ndarray, intensity_range: Optional[Sequence[float]] = None) -> np.ndarray:
    """Map stored intensities to float32 in [-1, 1] (the map volumes use too,
    :func:`~medsynth.data.base.scale_to_unit`; here the range comes from the stored type or ``intensity_range``).

    Args:
        arr: image as stored, shape ``(C, H, W)``.
        intensity_range: ``(low, high)`` stored values that map to -1 and 1 (values outside are clipped). When
            ``None``: 8-bit and 16-bit integers use their full range, booleans map to {-1, 1}, and anything else
            (float NPY, other integers) is min-max scaled per image; a constant image maps to 0.
    """
    if intensity_range is not None:
        lo, hi = float(intensity_range[0]), float(intensity_range[1])
    elif arr.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    elif arr.dtype == np.uint16:
        lo, hi = 0.0, 65535.0
    elif arr.dtype == np.bool_:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return scale_to_unit(arr, lo, hi).numpy()


def validate_records(records: Sequence[ImageRecord], channels: int, num_classes: int,
                     intensity_range: Optional[Sequence[float]] = None) -> None:
    """Read every file once and check it against the configuration, failing on the first problem.

    Checks: each file readable; image channel count; mask single-channel, integer and below ``num_classes``;
    image and mask of equal size; no NaN intensities; no image whose every value lies outside ``intensity_range``
    (it would train as a constant image).

    Raises:
        DataError: one line naming the file and the problem.
    """
    for rec in records:
        image = read_image(rec.image, channels) if rec.image is not None else None
        if image is not None and intensity_range is not None and image.size:
            lo, hi = float(intensity_range[0]), float(intensity_range[1])
            if image.max() < lo or image.min() > hi:
                raise DataError(f"{rec.image}: every value ({image.min()}..{image.max()}) lies outside "
                                f"data.intensity_range [{lo:g}, {hi:g}], so it would train as a constant image")
        if rec.mask is not None:
            mask = read_mask(rec.mask, num_classes)
            if image is not None and tuple(image.shape[1:]) != tuple(mask.shape):
                raise DataError(
                    f"{rec.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image {rec.image} "
                    f"({image.shape[2]}x{image.shape[1]})"
                )


def check_distinct(records: Sequence[ImageRecord]) -> None:
    """Refuse one file used by two records (a repeated record, or the same image in two splits: a validation or
    test score on training data). Files are compared by identity, so links and other spellings of a path count.

    Raises:
        DataError: one line naming the file and both of its records' splits.
    """
    seen: dict[tuple[int, int], tuple[ImageRecord, Path]] = {}
    for rec in records:
        for path in (rec.image, rec.mask):
            if path is None:
                continue
            try:
                st = Path(path).stat()
            except OSError:
                continue  # reported as missing or unreadable by the reader
            key = (st.st_dev, st.st_ino)
            other, other_path = seen.get(key, (None, None))
            if other is not None and other is not rec:
                where = (f"twice in split '{rec.split}'" if other.split == rec.split
                         else f"in splits '{other.split}' and '{rec.split}'")
                same = "" if Path(other_path) == Path(path) else f" (the same file as {other_path})"
                raise DataError(f"{path}: one file used {where}{same}; each example belongs to one record of one "
                                "split")
            seen[key] = (rec, path)


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(C, H, W)`` to ``(C, size, size)`` with antialiased bilinear interpolation."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def resize_mask(m: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an integer ``(H, W)`` mask to ``(size, size)`` by nearest neighbour, so no new labels appear."""
    if tuple(m.shape[-2:]) == (size, size):
        return m
    return F.interpolate(m[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()


class SegGuidedImageDataset(Dataset):
    """2D images with optional integer masks, resized to a square and normalised to [-1, 1].

    Each item is a dict: ``image`` ``(C, S, S)`` float32 in [-1, 1] (absent for mask-only records), ``mask``
    ``(S, S)`` int64 (absent for unconditional data), ``name`` (file name) and ``index``.

    Args:
        records: the examples.
        image_size: side ``S`` of the square the images and masks are resized to.
        channels: image channels expected on disk.
        num_classes: mask classes counting background (used to check labels).
        random_flip: flip image and mask together left-right with probability 0.5 (training augmentation).
        intensity_range: see :func:`to_unit_range`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        channels: int,
        num_classes: int,
        random_flip: bool = False,
        intensity_range: Optional[Sequence[float]] = None,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.random_flip = random_flip
        self.intensity_range = intensity_range

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        item: dict = {"name": rec.name, "index": index, "split": rec.split}
        flip = self.random_flip and torch.rand(()) < 0.5
        if rec.image is not None:
            arr = to_unit_range(read_image(rec.image, self.channels), self.intensity_range)
            x = resize_image(torch.from_numpy(arr), self.image_size)
            item["image"] = x.flip(-1) if flip else x
        if rec.mask is not None:
            m = resize_mask(torch.from_numpy(read_mask(rec.mask, self.num_classes)), self.image_size)
            item["mask"] = m.flip(-1) if flip else m
        return item


class IndexDataset(Dataset):
    """``n`` items carrying only a name and index: the inputs of unconditional sampling."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"name": f"sample_{index:05d}.png", "index": index}
