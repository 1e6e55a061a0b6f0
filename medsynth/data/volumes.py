"""3D volumes: JSON manifests, reading and validation, invertible intensity scaling, optional resampling and
reorientation, and the patch DataModule.

A volume is a NIfTI file (``.nii``/``.nii.gz``), an NRRD or MetaImage file (``.nrrd``/``.nhdr``, ``.mha``/``.mhd``)
or a folder holding one DICOM series (read through SimpleITK and torchio; see :func:`medsynth.io.read_itk_volume`).
A volume manifest takes one of three forms; relative paths resolve against the manifest's folder and must stay
inside it (``../`` out of it is refused; absolute paths are taken as they are)::

    [{"image": "ct/a.nii.gz", "label": 1, "split": "train"}, ...]   # records; label and split are optional
    [{"image": "ct/a.nii.gz", "mask": "labels/a.nii.gz"}, ...]      # with a label map (mask-guided diffusion)
    {"brats": "volumes/brats", "ixi": "volumes/ixi"}                 # 3D MedDiffusion: every volume per folder
    {"0": "volumes/healthy", "1": "volumes/tumour"}                  # integer keys 0..N-1: one folder per label

In the folder forms, the volumes of a folder are its volume files and its sub-folders that hold DICOM files (one
series each). A volume's name is its file name without the suffix (a DICOM series: its folder's name) and must be
unique across the manifest. Records without a split are divided into train and val by a hash of their name
(:func:`assign_splits`).

By default volumes keep the file's voxel order and affine exactly (no reorientation, no resampling), so an output
written with the input's affine overlays the input. :class:`Geometry` optionally reorients them to RAS and resamples
them to a chosen spacing on reading; outputs then carry that geometry. Arrays are channels-first ``(C, X, Y, Z)``,
``X, Y, Z`` being the file's first three axes; a multi-channel volume is a 4D file with the channels on its last axis.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torchio as tio
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset
from torchio.transforms.augmentation import RandomTransform

from medsynth.data.base import SPLITS, MedsynthDataModule, Record, name_fraction, resolve_listed_path, scale_to_unit
from medsynth.data.manifest import load_json
from medsynth.errors import DataError, MedsynthError
from medsynth.io import ITK_SUFFIXES, content_kind, read_itk_volume, read_nifti

NIFTI_SUFFIXES = (".nii.gz", ".nii")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)
RECORD_KEYS = ("image", "label", "split", "mask")
PLANES = ((0, 1), (0, 2), (1, 2))

Array = Union[np.ndarray, torch.Tensor]


VolumeRecord = Record
"""One 3D example (the one record type of 2D and 3D data, :class:`~medsynth.data.base.Record`; splits left
``None`` are assigned by :func:`assign_splits`, masks are label maps read by :func:`read_label_map`)."""


# ---------------------------------------------------------------------------------------------------- manifests


def volume_name(path: Path) -> Optional[str]:
    """The name of a volume: a file's name without its suffix (:data:`VOLUME_SUFFIXES`), a DICOM series folder's
    name; ``None`` for another file."""
    if path.is_dir():
        return path.name
    for suffix in VOLUME_SUFFIXES:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _holds_dicom(folder: Path) -> bool:
    """Whether a folder directly holds a DICOM file (judged by content: DICOM files often have no suffix)."""
    for p in folder.iterdir():
        try:
            if not p.name.startswith(".") and p.is_file() and content_kind(p) == "dicom":
                return True
        except OSError:
            continue
    return False


def list_volume_files(folder: Path) -> list[Path]:
    """The volumes directly inside ``folder``, sorted by name (hidden entries skipped): volume files
    (:data:`VOLUME_SUFFIXES`) and sub-folders holding DICOM files (one series each, checked when read)."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() and _holds_dicom(p) or p.is_file() and volume_name(p) is not None:
            found.append(p)
    return found


def _folder_records(manifest: Path, raw: dict) -> list[VolumeRecord]:
    """Records of the 3D MedDiffusion map ``{"name": "dir"}`` or class map ``{"0": "dir", "1": ...}``."""
    if not raw or not all(isinstance(v, str) for v in raw.values()):
        raise DataError(f"{manifest}: manifest object must map names or labels to folders of volumes")
    numeric = [k for k in raw if k.strip().lstrip("+-").isdigit()]
    labelled = bool(numeric)
    if labelled and len(numeric) < len(raw):
        raise DataError(f"{manifest}: keys mix labels ('{numeric[0]}') and names; use labels 0..N-1 or names only")
    if labelled and sorted(raw, key=lambda k: (len(k), k)) != [str(i) for i in range(len(raw))]:
        raise DataError(f"{manifest}: class labels {sorted(raw, key=lambda k: (len(k), k))} must be 0..{len(raw) - 1}, "
                        "each once, written plainly")
    records, folders = [], {}
    for key, rel in raw.items():
        folder = resolve_listed_path(manifest, rel, f"'{key}'")
        if not folder.is_dir():
            raise DataError(f"{manifest}: '{key}' names a missing folder {folder}")
        real = os.path.realpath(folder)
        if real in folders:
            raise DataError(f"{manifest}: '{folders[real]}' and '{key}' name the same folder {folder}; each key needs "
                            "its own")
        folders[real] = key
        files = list_volume_files(folder)
        if not files:
            raise DataError(f"{manifest}: folder {folder} ('{key}') holds no volumes ({', '.join(VOLUME_SUFFIXES)} "
                            "files or DICOM series folders)")
        label = int(key) if labelled else None
        records += [VolumeRecord(volume_name(f), Path(os.path.abspath(f)), label) for f in files]
    return records


def _listed_records(manifest: Path, raw: list) -> list[VolumeRecord]:
    """Records of the list form ``[{"image": ..., "label": ..., "split": ...}, ...]``."""
    records = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise DataError(f"{manifest}: record {i} is not an object")
        unknown = sorted(set(entry) - set(RECORD_KEYS))
        if unknown:
            raise DataError(f"{manifest}: record {i} has unknown key '{unknown[0]}' "
                            f"(expected {', '.join(RECORD_KEYS)})")
        if "image" not in entry:
            raise DataError(f"{manifest}: record {i} has no 'image'")
        image = resolve_listed_path(manifest, entry["image"], f"record {i}")
        if not image.exists():
            raise DataError(f"{manifest}: record {i} image {image} does not exist")
        name = volume_name(image)
        if name is None:
            raise DataError(f"{manifest}: record {i} image {image} is not a volume ({', '.join(VOLUME_SUFFIXES)} or "
                            "a DICOM series folder)")
        label = entry.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise DataError(f"{manifest}: record {i} label {label!r} is not a non-negative integer")
        split = entry.get("split")
        if split is not None and split not in SPLITS:
            raise DataError(f"{manifest}: record {i} has split {split!r}; expected one of {', '.join(SPLITS)}")
        mask = resolve_listed_path(manifest, entry["mask"], f"record {i} mask") if entry.get("mask") is not None else None
        if mask is not None and not mask.is_file():
            raise DataError(f"{manifest}: record {i} ({name}) label map {mask} does not exist")
        records.append(VolumeRecord(name, image, label, split, mask))
    return records


def read_volume_manifest(path: Union[str, Path]) -> list[VolumeRecord]:
    """Read a volume manifest (see the module docstring) into records with absolute paths, in file order.

    The files are only listed here; :func:`check_volume` reads them.

    Raises:
        DataError: missing or malformed manifest, a missing or empty folder, a missing image file, duplicate
            names, an unknown split, a label that is not a non-negative integer, labels on some records only.
    """
    path = Path(path)
    raw = load_json(path, "manifest")
    if isinstance(raw, dict):
        records = _folder_records(path, raw)
    elif isinstance(raw, list):
        records = _listed_records(path, raw)
    else:
        raise DataError(f"{path}: manifest must be a list of records or an object mapping names/labels to folders")
    if not records:
        raise DataError(f"{path}: manifest lists no volumes")
    seen: dict[str, Path] = {}
    for r in records:
        if r.name in seen:
            raise DataError(f"{path}: two volumes are named '{r.name}' ({seen[r.name]} and {r.image}); "
                            "names (file names without .nii/.nii.gz) must be unique")
        seen[r.name] = r.image
    unlabelled = [r for r in records if r.label is None]
    if unlabelled and len(unlabelled) < len(records):
        raise DataError(f"{path}: volume '{unlabelled[0].name}' has no label while others have; label all or none")
    unmasked = [r for r in records if r.mask is None]
    if unmasked and len(unmasked) < len(records):
        raise DataError(f"{path}: volume '{unmasked[0].name}' has no label map ('mask') while others have; give "
                        "every volume its label map or none")
    return records


def attach_masks(records: Sequence[VolumeRecord], folder: Path) -> list[VolumeRecord]:
    """The records with their label maps from ``folder``: the file named like each volume (``NAME.nii.gz``,
    ``NAME.nii`` or another volume suffix).

    Raises:
        DataError: the folder is missing, or a volume has no partner label map in it (named in the message).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.masks={folder}: not a folder of label maps")
    out = []
    for r in records:
        found = [folder / f"{r.name}{suffix}" for suffix in VOLUME_SUFFIXES if (folder / f"{r.name}{suffix}").is_file()]
        if not found:
            raise DataError(f"{r.image}: no partner label map {folder / (r.name + '.nii.gz')} (label maps are named "
                            "like their volumes)")
        out.append(replace(r, mask=Path(os.path.abspath(found[0]))))
    return out


def assign_splits(records: Sequence[VolumeRecord], val_fraction: float = 0.2,
                  source: Union[str, Path] = "manifest") -> list[VolumeRecord]:
    """Give every record without a split ``train`` or ``val``, deterministically from its name.

    A record goes to ``val`` when a hash of its name, as a number in [0, 1), is below ``val_fraction``, so adding
    volumes never moves the others. Records with an explicit split keep it (only those marked ``test`` are test).
    When no record is in ``val``, the unsplit record with the smallest hash goes there; when none is left in
    ``train``, the one with the largest hash goes back.

    Args:
        records: the manifest's records.
        val_fraction: fraction of the unsplit records that goes to ``val``, in [0, 1).
        source: what the records come from (the manifest path), for error messages.

    Raises:
        DataError: no ``val`` volume can be had without emptying ``train`` (fewer than 2 volumes, no explicit splits).
    """
    free = sorted((r for r in records if r.split is None), key=lambda r: name_fraction(r.name))
    if not free:
        return list(records)
    val = {r.name for r in free if name_fraction(r.name) < val_fraction}
    if not val and not any(r.split == "val" for r in records):
        val = {free[0].name}
    if len(val) == len(free) and not any(r.split == "train" for r in records):
        val.discard(free[-1].name)
    if not val and not any(r.split == "val" for r in records):
        raise DataError(f"{source}: needs at least 2 volumes or explicit splits (one for train, one for val)")
    return [r if r.split is not None else replace(r, split="val" if r.name in val else "train") for r in records]


# ---------------------------------------------------------------------------------------------------- reading


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def read_volume(path: Union[str, Path], channels: int = 1,
                geometry: Optional[Geometry] = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a volume: a channels-first float32 array ``(C, X, Y, Z)`` and its ``(4, 4)`` affine (mm, RAS).

    Without ``geometry`` the voxel order and affine are the file's (no reorientation). NIfTI scaling
    (``scl_slope``/``scl_inter``) and DICOM rescaling are applied. A 4D file with one entry on its last axis counts
    as 3D; NIfTI vector data ``(X, Y, Z, 1, C)`` is accepted too.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr`` or ``.mha``/``.mhd`` file, or a DICOM series folder.
        channels: expected channels: 1 means a 3D file; more means a 4D file with ``channels`` on its last axis.
        geometry: reorientation and resampling applied after reading (see :class:`Geometry`).

    Raises:
        DataError: one line naming the file: missing, unreadable (corrupt or truncated, a broken DICOM series), not
            3D, a wrong channel count, an empty axis, NaN or infinite intensities.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in ITK_SUFFIXES:
        data, affine = read_itk_volume(path, "volume")
    else:
        data, affine = read_nifti(path, "volume")
    shape = data.shape
    if data.ndim == 5 and shape[3] == 1:  # NIfTI keeps vector (channel) data on the 5th axis
        data = data[:, :, :, 0]
    if data.ndim == 4 and channels == 1 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 3 and channels == 1:
        data = data[None]
    elif data.ndim == 3:
        raise DataError(f"{path}: 3D volume {_shape_str(shape)} but data.channels={channels}; a multi-channel "
                        "volume is 4D with the channels on its last axis")
    elif data.ndim == 4 and channels == 1:
        raise DataError(f"{path}: 4D volume {_shape_str(shape)} where 3D was expected (data.channels=1); store one "
                        f"volume per file, or set data.channels={shape[3]} if the last axis holds channels")
    elif data.ndim == 4 and data.shape[3] != channels:
        raise DataError(f"{path}: volume {_shape_str(shape)} has {data.shape[3]} channels on its last axis but "
                        f"data.channels={channels}")
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    else:
        raise DataError(f"{path}: {data.ndim}D array {_shape_str(shape)}; expected a 3D volume")
    bad = int(data.size - np.isfinite(data).sum())
    if bad:
        raise DataError(f"{path}: {bad} NaN or infinite intensities; replace them before training")
    if geometry is not None:
        data, affine = geometry.apply(data, affine)
    return np.ascontiguousarray(data), affine


def _patch_shape(patch_size: Union[int, Sequence[int]]) -> tuple[int, int, int]:
    return (int(patch_size),) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(int(p) for p in patch_size)


def check_patch_fits(path: Union[str, Path], spatial_shape: Sequence[int],
                     patch_size: Union[int, Sequence[int]]) -> None:
    """A check that a patch fits in a volume: DataError naming the file when the patch is larger on some axis."""
    patch = _patch_shape(patch_size)
    if any(p > s for p, s in zip(patch, spatial_shape)):
        raise DataError(f"{path}: patch {_shape_str(patch)} larger than volume {_shape_str(spatial_shape)}; "
                        "lower --data.patch_size")


def check_volume(path: Union[str, Path], channels: int = 1, patch_size: Union[int, Sequence[int], None] = None,
                 geometry: Optional[Geometry] = None) -> tuple[int, ...]:
    """Read a volume and check it is usable (see :func:`read_volume`); returns its spatial shape ``(X, Y, Z)``
    (after ``geometry``, when given).

    Args:
        path: a volume file or DICOM series folder (see :func:`read_volume`).
        channels: expected channels (1: a 3D file; more: 4D with channels last).
        patch_size: side of the cubic training patch (or its 3 sides), in voxels; ``None`` skips the size check.
        geometry: reorientation and resampling applied after reading.

    Raises:
        DataError: as :func:`read_volume`, or a patch larger than the volume on some axis.
    """
    data, _ = read_volume(path, channels, geometry)
    spatial = tuple(int(s) for s in data.shape[1:])
    if patch_size is not None:
        check_patch_fits(path, spatial, patch_size)
    return spatial


def _torchio_reader(path: Union[str, Path], channels: int,
                    geometry: Optional[Geometry] = None) -> tuple[torch.Tensor, np.ndarray]:
    """Reader for ``tio.ScalarImage``: the checked channels-first tensor and its affine."""
    data, affine = read_volume(path, channels, geometry)
    return torch.from_numpy(data), affine


def read_label_map(path: Union[str, Path], num_classes: Optional[int] = None,
                   grid: Optional[tuple[Sequence[int], np.ndarray]] = None,
                   geometry: Optional[Geometry] = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and check an integer label map ``(X, Y, Z)`` int64 (0 = background) and its ``(4, 4)`` affine.

    With ``grid`` (an image's spatial shape and affine) the label map is put on the image's voxel grid: kept as it
    is when it has that grid, else resampled onto it by nearest neighbour (``tio.Resample``), which needs the label
    map to cover the image's field of view.

    Args:
        path: a volume file or DICOM series folder holding integer labels (see :func:`read_volume`).
        num_classes: ``K`` counting background: labels must lie in ``0..K-1``; ``None`` checks only that they are
            non-negative integers.
        grid: ``(spatial_shape, affine)`` of the image the label map belongs to.
        geometry: the reorientation/resampling applied to the images (nearest neighbour for labels).

    Raises:
        DataError: one line naming the file: unreadable, not 3D, non-integer or negative labels, a label ``>= K``,
            or a grid that does not cover the image's.
    """
    data, affine = read_volume(path, 1, None)
    if not np.array_equal(data, np.round(data)) or data.min() < 0:
        raise DataError(f"{path}: label map holds non-integer or negative values; expected class indices 0..K-1")
    if num_classes is not None and int(data.max()) >= num_classes:
        raise DataError(f"{path}: label map holds label {int(data.max())} >= data.num_classes={num_classes} "
                        "(classes count background)")
    labels = data.astype(np.int64)
    if geometry is not None:
        labels, affine = geometry.apply(labels, affine, label_map=True)
    if grid is not None:
        shape, target = tuple(int(s) for s in grid[0]), np.asarray(grid[1], dtype=np.float64)
        same = labels.shape[1:] == shape and np.allclose(affine, target, atol=1e-3)
        if not same:
            corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                                for k in (0, shape[2] - 1)]).T
            inside = np.linalg.solve(affine, target @ corners)[:3]  # image corners in label-map voxels
            if ((inside < -0.5 - 1e-3) | (inside > np.array(labels.shape[1:])[:, None] - 0.5 + 1e-3)).any():
                raise DataError(f"{path}: label map of grid {_shape_str(labels.shape[1:])} does not cover its "
                                f"image's grid {_shape_str(shape)} in world coordinates (affines); cannot resample "
                                "it onto the image: give the label map the image's grid")
            resampled = tio.Resample((shape, target))(tio.LabelMap(tensor=torch.from_numpy(labels), affine=affine))
            labels, affine = resampled.data.numpy().astype(np.int64), target
    return np.ascontiguousarray(labels[0]), affine


def _label_reader(path: Union[str, Path], num_classes: Optional[int], grid: tuple[Sequence[int], np.ndarray],
                  geometry: Optional[Geometry] = None) -> tuple[torch.Tensor, np.ndarray]:
    """Reader for ``tio.LabelMap``: the checked label map on its image's grid, ``(1, X, Y, Z)``."""
    labels, affine = read_label_map(path, num_classes, grid, geometry)
    return torch.from_numpy(labels[None]), affine


# ---------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Optional reorientation and resampling of volumes as they are read, so every volume has one voxel grid
    convention whatever the scanner wrote.

    Args:
        spacing: voxel sides in mm to resample to (``tio.Resample``; trilinear for images, nearest neighbour for
            label maps); ``None`` keeps each file's spacing.
        canonical: reorder and flip the voxel axes to RAS+ (``tio.ToCanonical``: the voxel axes run towards the
            patient's Right, Anterior and Superior); a permutation and flips only, no interpolation.
    """

    spacing: Optional[tuple[float, float, float]] = None
    canonical: bool = False

    def __post_init__(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3
                                         or not all(np.isfinite(v) and v > 0 for v in self.spacing)):
            raise DataError(f"data.target_spacing={list(self.spacing)}: give three positive voxel sides in mm")

    @property
    def active(self) -> bool:
        return self.spacing is not None or self.canonical

    def describe(self) -> dict:
        """What a manifest records: ``target_spacing`` (mm, or ``None`` for the files' own) and ``canonical``."""
        return {"target_spacing": list(self.spacing) if self.spacing else None, "canonical": self.canonical}

    def apply(self, data: np.ndarray, affine: np.ndarray, label_map: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Reorient and resample one volume ``(C, X, Y, Z)`` with its affine; returns the new array and affine."""
        if not self.active:
            return data, affine
        kind = tio.LabelMap if label_map else tio.ScalarImage
        image = kind(tensor=torch.from_numpy(np.ascontiguousarray(data)), affine=affine)
        steps = [tio.ToCanonical()] if self.canonical else []
        if self.spacing is not None:
            steps.append(tio.Resample(tuple(float(v) for v in self.spacing)))
        image = tio.Compose(steps)(image)
        return image.data.numpy().astype(np.float32 if not label_map else data.dtype), np.asarray(image.affine)


# ---------------------------------------------------------------------------------------------------- intensities


@dataclass(frozen=True)
class Normalization:
    """Invertible per-volume intensity scaling to [-1, 1]: a clip to ``(low, high)`` then a linear map.

    ``mri``: ``(low, high)`` are the ``percentiles`` of the volume's nonzero voxels (all voxels when every one is
    zero), over all channels together, so a zero background does not pull the lower bound down. ``ct``:
    ``(low, high)`` is the fixed Hounsfield ``window``. A constant volume gets ``high = low + 1`` (it maps to -1).
    :meth:`from_unit` inverts the map exactly for intensities inside ``(low, high)``, so outputs can be written
    back in the input's units.

    Args:
        mode: ``mri`` (per-volume percentile clip) or ``ct`` (fixed HU window).
        percentiles: lower and upper percentiles in [0, 100] used by ``mri``.
        window: lower and upper intensity (HU) used by ``ct``.
    """

    mode: Literal["mri", "ct"] = "mri"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (-1000.0, 1000.0)

    def __post_init__(self) -> None:
        if self.mode not in ("mri", "ct"):
            raise MedsynthError(f"data.normalization={self.mode!r}: expected 'mri' or 'ct'")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise MedsynthError(f"data.percentiles={tuple(self.percentiles)}: need 0 <= low < high <= 100")
        if not self.window[0] < self.window[1]:
            raise MedsynthError(f"data.ct_window={tuple(self.window)}: need low < high")

    def intensity_range(self, array: Array) -> tuple[float, float]:
        """The ``(low, high)`` intensities this normalisation maps to -1 and 1 for one volume (any shape)."""
        if self.mode == "ct":
            return float(self.window[0]), float(self.window[1])
        values = np.asarray(array, dtype=np.float32).ravel()
        nonzero = values[values != 0]
        low, high = (float(v) for v in np.percentile(nonzero if nonzero.size else values, self.percentiles))
        return (low, high) if high > low else (low, low + 1.0)

    def to_unit(self, array: Array) -> tuple[torch.Tensor, tuple[float, float]]:
        """Scale one volume to [-1, 1]; returns the float32 tensor (same shape) and the ``(low, high)`` used."""
        low, high = self.intensity_range(array)
        return scale_to_unit(array, low, high), (low, high)

    def describe(self, ranges: Sequence[tuple[float, float]] = ()) -> dict:
        """What a latent manifest records about this scaling, so outputs can be written back in the inputs' units.

        ``low``/``high`` are what -1 and 1 stand for in volumes that have no source of their own (generated ones):
        the CT window exactly; for ``mri`` the medians over ``ranges`` (the per-volume ranges of the encoded
        volumes), an approximation, since each MRI volume had its own percentiles (``exact: false``).

        Args:
            ranges: the ``(low, high)`` each encoded volume was scaled with.
        """
        if self.mode == "ct":
            return {"mode": "ct", "units": "HU", "window": list(self.window), "low": float(self.window[0]),
                    "high": float(self.window[1]), "exact": True}
        out = {"mode": "mri", "units": "arbitrary (the scanner's)", "percentiles": list(self.percentiles),
               "exact": False}
        if len(ranges):
            lows, highs = np.asarray(ranges, dtype=np.float64).T
            out.update(low=float(np.median(lows)), high=float(np.median(highs)))
        return out

    @staticmethod
    def from_unit(tensor: Array, low: float, high: float) -> torch.Tensor:
        """Map [-1, 1] values back to intensities: the inverse of :meth:`to_unit` with the ``(low, high)`` it gave.

        Args:
            tensor: values in [-1, 1], any shape.
            low: the intensity that -1 stands for.
            high: the intensity that 1 stands for.

        Returns:
            float32 intensities in ``[low, high]`` units (input outside [-1, 1] maps linearly outside).
        """
        x = torch.as_tensor(tensor).double()
        return ((x + 1.0) * ((high - low) / 2.0) + low).float()


class ScaleToUnit(tio.IntensityTransform):
    """Scales each subject's images to [-1, 1] with the ``norm_low``/``norm_high`` the subject carries.

    The range is computed once per volume at setup (:meth:`Normalization.intensity_range`), so every patch of a
    volume, in every epoch, uses the same map.
    """

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            image.set_data(scale_to_unit(image.data, subject["norm_low"], subject["norm_high"]))
        return subject


# ---------------------------------------------------------------------------------------------------- augmentation


class Rot90(tio.SpatialTransform):
    """A rotation by ``k`` quarter turns in the plane of two spatial axes, as ``np.rot90(x, k, axes)`` on ``(X, Y, Z)``.

    The affine is left as it is: meant for training patches, whose position in the world is not used.

    Args:
        k: quarter turns (any integer; negative turns the other way).
        axes: the two spatial axes (0..2) of the plane; for odd ``k`` they must have the same length.
    """

    def __init__(self, k: int = 1, axes: tuple[int, int] = (0, 1)) -> None:
        super().__init__()
        if len(axes) != 2 or axes[0] == axes[1] or not set(axes) <= {0, 1, 2}:
            raise ValueError(f"Rot90 axes {axes}: expected two different spatial axes in 0..2")
        self.k, self.axes = int(k), (int(axes[0]), int(axes[1]))
        self.args_names = ["k", "axes"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        dims = (self.axes[0] + 1, self.axes[1] + 1)  # data is (C, X, Y, Z)
        for image in self.get_images(subject):
            if self.k % 2 and image.data.shape[dims[0]] != image.data.shape[dims[1]]:
                raise ValueError(f"Rot90 in plane {self.axes} of a {_shape_str(image.spatial_shape)} image "
                                 "changes its shape; rotate only planes with equal sides")
            image.set_data(torch.rot90(image.data, self.k, dims).contiguous())
        return subject

    def is_invertible(self) -> bool:
        return True

    def inverse(self) -> Rot90:
        return Rot90(-self.k, self.axes)


class RandomRot90(RandomTransform, tio.SpatialTransform):
    """A random number of quarter turns (0 to 3, equally likely) in a random plane whose two sides are equal.

    Planes whose sides differ are never rotated (the shape is kept); a cubic patch may turn in any of the three.
    """

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        shape = subject.spatial_shape
        planes = [p for p in PLANES if shape[p[0]] == shape[p[1]]]
        if not planes:
            return subject
        plane = planes[int(torch.randint(len(planes), ()))]
        k = int(torch.randint(4, ()))
        return Rot90(k, plane)(subject) if k else subject


# ---------------------------------------------------------------------------------------------------- datasets


class VolumeDataset(Dataset):
    """Whole volumes scaled to [-1, 1], for prediction (encoding, reconstruction, sampling shapes).

    Items: ``image`` ``(C, X, Y, Z)`` float32 in [-1, 1] in the file's voxel order (after ``geometry``), ``name``,
    ``path`` (str), ``affine`` ``(4, 4)`` float64 (the file's, or the resampled grid's), ``norm_low``/``norm_high``
    (the intensities -1 and 1 stand for, see :meth:`Normalization.from_unit`), ``index`` (position in this dataset)
    and ``label`` when the records have one; ``mask`` ``(X, Y, Z)`` int64 (the label map on the image's grid) and
    ``mask_path`` when they have label maps.

    Args:
        records: the volumes, in item order.
        channels: image channels (see :func:`read_volume`).
        normalization: the intensity scaling.
        geometry: reorientation and resampling on reading.
        num_classes: ``K`` the label maps' labels must stay below (``None``: unchecked).
    """

    def __init__(self, records: Sequence[VolumeRecord], channels: int, normalization: Normalization,
                 geometry: Optional[Geometry] = None, num_classes: Optional[int] = None) -> None:
        self.records, self.channels, self.normalization = list(records), channels, normalization
        self.geometry, self.num_classes = geometry, num_classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        data, affine = read_volume(rec.image, self.channels, self.geometry)
        x, (low, high) = self.normalization.to_unit(data)
        item = {"image": x, "name": rec.name, "path": str(rec.image), "affine": torch.from_numpy(affine),
                "norm_low": low, "norm_high": high, "index": index, "split": rec.split or ""}
        if rec.label is not None:
            item["label"] = rec.label
        if rec.mask is not None:
            mask, _ = read_label_map(rec.mask, self.num_classes, (data.shape[1:], affine), self.geometry)
            item["mask"], item["mask_path"] = torch.from_numpy(mask), str(rec.mask)
        return item


class PatchQueueDataset(Dataset):
    """Training patches popped from a ``tio.Queue``, augmented, as dicts ``image`` ``(C, P, P, P)`` (+ ``label``).

    The queue samples in the main process; read it through a DataLoader with ``num_workers=0`` (the queue has
    its own workers that load volumes).

    Args:
        queue: the patch queue.
        augment: transform applied to each patch, or ``None``.
    """

    def __init__(self, queue: tio.Queue, augment: Optional[tio.Transform] = None) -> None:
        self.queue, self.augment = queue, augment

    def __len__(self) -> int:
        return len(self.queue)

    def __getitem__(self, index: int) -> dict:
        patch = self.queue[index]
        if self.augment is not None:
            patch = self.augment(patch)
        mask = patch["mask"].data[0] if "mask" in patch else None
        return _patch_item(patch["image"].data, patch.get("label"), mask)


def _patch_item(image: torch.Tensor, label: Optional[int], mask: Optional[torch.Tensor] = None) -> dict:
    item = {"image": image.float().contiguous()}
    if label is not None:
        item["label"] = int(label)
    if mask is not None:  # (P, P, P) class indices of the same patch
        item["mask"] = mask.long().contiguous()
    return item


# ---------------------------------------------------------------------------------------------------- datamodule


class VolumeDataModule(MedsynthDataModule):
    """3D volumes (NIfTI, NRRD, MetaImage, DICOM series) through torchio: random cubic patches for training, fixed
    patches for validation.

    Training draws ``samples_per_volume`` uniformly placed patches from each volume in turn through a
    ``tio.Queue`` (volumes loaded by ``num_workers`` processes), flipped and turned by quarter turns at random.
    Validation uses ``val_patches_per_volume`` patches per volume at positions fixed by the volume's name (held in
    memory, so validation scores compare across epochs). Prediction yields whole volumes one at a time (see
    :class:`VolumeDataset`). Intensities go to [-1, 1] per volume (see :class:`Normalization`). Every volume of
    the splits a stage uses is read and checked in ``setup`` (one line naming the first bad file). With
    ``target_spacing`` or ``canonical`` every volume is resampled or reoriented as it is read (see :class:`Geometry`),
    and outputs (reconstructions, latents' affines and so generated volumes) carry that grid.

    Args:
        manifest: JSON volume manifest (see :mod:`medsynth.data.volumes`).
        patch_size: side in voxels of the cubic training and validation patches; every train/val volume must be at
            least this large on each axis.
        channels: image channels: 1 for 3D files; more for 4D files with the channels on the last axis.
        normalization: ``mri`` (per-volume percentile clip) or ``ct`` (fixed HU window), mapped to [-1, 1]; recorded
            in latent manifests and inverted when outputs are written (see :meth:`Normalization.describe`).
        percentiles: lower and upper percentiles (0..100) of the nonzero voxels clipped to, for ``mri``.
        ct_window: lower and upper intensities in HU clipped to, for ``ct``.
        val_fraction: fraction (0..1) of the volumes without an explicit split that goes to ``val``.
        samples_per_volume: training patches drawn from a volume each time it is loaded.
        queue_length: patches the training queue holds (more mixes volumes better, costs memory).
        val_patches_per_volume: fixed validation patches per ``val`` volume.
        batch_size: patches per training/validation batch (prediction uses 1: whole volumes differ in size).
        num_workers: processes loading volumes (for the training queue and prediction).
        random_flip: flip training patches along each axis with probability 0.5.
        random_rot90: turn training patches by 0-3 quarter turns in a random plane.
        predict_split: the volumes ``predict`` yields: ``all`` of them in manifest order, or one split.
        target_spacing: resample every volume on reading to these voxel sides in mm (e.g. ``[1.5, 1.5, 1.5]``);
            default: each file's own spacing.
        canonical: reorient every volume on reading to RAS+ voxel axes (permutation and flips, no interpolation).
        masks: a folder of integer label maps named like the volumes (``NAME.nii.gz``), for mask-guided diffusion
            (instead of ``mask`` entries in the manifest). A label map on another grid than its volume's is
            resampled onto it by nearest neighbour.
        num_classes: label-map classes counting background (labels ``0..K-1``); ``None`` counts them from the
            label maps (largest label + 1). Ignored without label maps.
    """

    model_describing_args = ("num_classes", "channels", "patch_size", "normalization", "percentiles", "ct_window")
    data_location_args = ("manifest",)

    def __init__(
        self,
        manifest: Optional[Path] = None,
        patch_size: PositiveInt = 64,
        channels: PositiveInt = 1,
        normalization: Literal["mri", "ct"] = "mri",
        percentiles: tuple[float, float] = (0.5, 99.5),
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        val_fraction: float = 0.2,
        samples_per_volume: PositiveInt = 8,
        queue_length: PositiveInt = 64,
        val_patches_per_volume: PositiveInt = 4,
        batch_size: PositiveInt = 2,
        num_workers: NonNegativeInt = 2,
        random_flip: bool = True,
        random_rot90: bool = True,
        predict_split: Literal["all", "train", "val", "test"] = "all",
        target_spacing: Optional[list[float]] = None,
        canonical: bool = False,
        masks: Optional[Path] = None,
        num_classes: Optional[NonNegativeInt] = None,
    ) -> None:
        super().__init__()
        for arg, value, least in (("patch_size", patch_size, 1), ("channels", channels, 1),
                                  ("samples_per_volume", samples_per_volume, 1), ("queue_length", queue_length, 1),
                                  ("val_patches_per_volume", val_patches_per_volume, 1),
                                  ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if value < least:
                raise DataError(f"data.{arg}={value}: must be at least {least}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise DataError(f"data.percentiles={list(percentiles)}: need 0 <= low < high <= 100")
        if not ct_window[0] < ct_window[1]:
            raise DataError(f"data.ct_window={list(ct_window)}: low must be below high")
        if predict_split not in ("all", *SPLITS):
            raise DataError(f"data.predict_split={predict_split!r}: expected all, {', '.join(SPLITS)}")
        if num_classes is not None and num_classes < 2:
            raise DataError(f"data.num_classes={num_classes}: label maps have at least 2 classes (counting "
                            "background); leave it unset to count them")
        self.save_hyperparameters(logger=False)  # logged under "data" by the CLI (cli.LogDataSettings)
        self.manifest = Path(manifest) if manifest is not None else None
        self.patch_size, self.channels = patch_size, channels
        self.normalization = Normalization(normalization, tuple(percentiles), tuple(ct_window))
        self.geometry = Geometry(tuple(float(v) for v in target_spacing) if target_spacing is not None else None,
                                 bool(canonical))
        self.val_fraction = val_fraction
        self.samples_per_volume, self.queue_length = samples_per_volume, queue_length
        self.val_patches_per_volume = val_patches_per_volume
        self.batch_size, self.num_workers = batch_size, num_workers
        self.random_flip, self.random_rot90 = random_flip, random_rot90
        self.predict_split = predict_split
        self.masks = Path(masks) if masks is not None else None
        self._num_classes = num_classes
        self._records: Optional[list[VolumeRecord]] = None

    # -- what the data is

    def records(self) -> list[VolumeRecord]:
        """Every record of the manifest, each with its split decided (read once, then cached)."""
        if self._records is None:
            if self.manifest is None:
                raise DataError("data.manifest is not set: give a JSON manifest of volumes (NIfTI, NRRD, MetaImage, DICOM)")
            records = assign_splits(read_volume_manifest(self.manifest), self.val_fraction, self.manifest)
            if self.masks is not None:
                records = attach_masks(records, self.masks)
            self._records = records
        return self._records

    @property
    def num_classes(self) -> int:
        """Label-map classes counting background: ``data.num_classes``, or counted from the label maps (largest
        label + 1, at least 2); 0 when the volumes have no label maps."""
        if not any(r.mask is not None for r in self.records()):
            return 0
        if self._num_classes is None:
            largest = max(int(read_volume(r.mask, 1)[0].max()) for r in self.records())
            self._num_classes = max(largest + 1, 2)
        return int(self._num_classes)

    def split_records(self, split: str) -> list[VolumeRecord]:
        """The records of one split (``all``: every record), in manifest order; an empty split is an error."""
        records = [r for r in self.records() if split == "all" or r.split == split]
        if not records:
            raise DataError(f"{self.manifest}: empty split '{split}': no volumes (give records that split)")
        return records

    @property
    def class_names(self) -> Optional[list[str]]:
        """``"0"``..``"N-1"`` (N = largest label + 1) when the volumes carry labels, else ``None``."""
        labels = [r.label for r in self.records() if r.label is not None]
        return [str(i) for i in range(max(labels) + 1)] if labels else None

    def model_args(self) -> dict:
        """What the model must know about this data (linked into the model's arguments by the CLI)."""
        return {"image_channels": self.channels, "image_size": self.patch_size, "num_classes": self.num_classes,
                "class_names": self.class_names, "output": "image"}

    # -- datasets

    def _subjects(self, records: list[VolumeRecord]) -> list[tio.Subject]:
        """Lazily loaded torchio subjects, each checked now and carrying its intensity range."""
        reader = partial(_torchio_reader, channels=self.channels, geometry=self.geometry)
        subjects = []
        for rec in records:
            data, affine = read_volume(rec.image, self.channels, self.geometry)
            check_patch_fits(rec.image, data.shape[1:], self.patch_size)
            low, high = self.normalization.intensity_range(data)
            fields = {"image": tio.ScalarImage(rec.image, reader=reader), "name": rec.name,
                      "norm_low": low, "norm_high": high}
            if rec.label is not None:
                fields["label"] = rec.label
            if rec.mask is not None:  # checked now; patches and augmentations then cut and turn it with the image
                grid = (data.shape[1:], affine)
                read_label_map(rec.mask, self.num_classes, grid, self.geometry)
                fields["mask"] = tio.LabelMap(rec.mask, reader=partial(_label_reader, num_classes=self.num_classes,
                                                                       grid=grid, geometry=self.geometry))
            subjects.append(tio.Subject(fields))
        return subjects

    def _fixed_patches(self, records: list[VolumeRecord]) -> list[dict]:
        """``val_patches_per_volume`` patches per volume at positions seeded by the volume's name."""
        p = self.patch_size
        items = []
        for rec in records:
            data, affine = read_volume(rec.image, self.channels, self.geometry)
            check_patch_fits(rec.image, data.shape[1:], p)
            x, _ = self.normalization.to_unit(data)
            mask = (torch.from_numpy(read_label_map(rec.mask, self.num_classes, (data.shape[1:], affine),
                                                    self.geometry)[0]) if rec.mask is not None else None)
            rng = np.random.default_rng(int(hashlib.sha1(rec.name.encode()).hexdigest()[:16], 16))
            for i, j, k in rng.integers(0, np.array(data.shape[1:]) - p + 1, size=(self.val_patches_per_volume, 3)):
                window = (slice(i, i + p), slice(j, j + p), slice(k, k + p))
                items.append(_patch_item(x[(slice(None), *window)].clone(), rec.label,
                                         mask[window].clone() if mask is not None else None))
        return items

    def _train_dataset(self) -> PatchQueueDataset:
        augment = [tio.RandomFlip(axes=(0, 1, 2))] if self.random_flip else []
        augment += [RandomRot90()] if self.random_rot90 else []
        records = self.split_records("train")
        subjects = tio.SubjectsDataset(self._subjects(records), transform=ScaleToUnit(copy=False))
        queue = tio.Queue(subjects, max_length=max(self.queue_length, self.batch_size),
                          samples_per_volume=self.samples_per_volume, sampler=tio.UniformSampler(self.patch_size),
                          num_workers=self.num_workers, shuffle_subjects=True, shuffle_patches=True)
        return PatchQueueDataset(queue, tio.Compose(augment) if augment else None)

    def dataset(self, split: str) -> Dataset:
        if split == "train":
            return self._train_dataset()
        if split != "predict":
            return self._fixed_patches(self.split_records(split))
        records = self.split_records(self.predict_split)
        k = self.num_classes or None
        for rec in records:
            data, affine = read_volume(rec.image, self.channels, self.geometry)
            if rec.mask is not None:
                read_label_map(rec.mask, k, (data.shape[1:], affine), self.geometry)
        return VolumeDataset(records, self.channels, self.normalization, self.geometry, k)

    def loader_options(self, split: str) -> dict:
        options = super().loader_options(split)
        if split == "predict":  # whole volumes of any size, one at a time
            return {**options, "batch_size": 1}
        # torchio rule: the queue loads volumes with its own workers (and shuffles patches); the loader that pops
        # patches must use none
        return {**options, "shuffle": False, "drop_last": False, "num_workers": 0, "persistent_workers": False}
