"""The demo datasets, built from the MNI152 brain template that nilearn ships (no download).

nilearn installs ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (197x233x189, 1 mm, skull-stripped
T1 and grey/white-matter probability maps stored as 0..255). 2D slices with tissue masks (written in the reference
layout) and 3D halves of the T1 (NIfTI with a volume manifest) are built once into a cache folder, then read like user
data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt

from medsynth.data.classes import ClassImageDataModule, class_map_files
from medsynth.data.datamodules import SegGuidedImageDataModule
from medsynth.data.volumes import VolumeDataModule
from medsynth.errors import DataError
from medsynth.io import save_json, save_png

Plane = Literal["axial", "coronal", "sagittal"]
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
CLASS_NAMES = ("background", "grey_matter", "white_matter")
CACHE_VERSION = "v1"


def default_cache_dir() -> Path:
    """``$MEDSYNTH_CACHE``, else ``~/.cache/medsynth``: built demo data lives here, apart from user data."""
    return Path(os.environ.get("MEDSYNTH_CACHE", Path.home() / ".cache" / "medsynth"))


def mni152_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM volumes inside the installed nilearn package.

    The package is located, never imported: ``make install`` installs nilearn without its dependencies (pandas,
    scikit-learn), which importing it would need.
    """
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo data needs nilearn's template files: pip install --no-deps nilearn")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for f in files.values():
        if not f.is_file():
            raise DataError(f"{f}: MNI152 template missing from the nilearn installation")
    return files


def mni152_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The T1 volume and the grey- and white-matter probability maps (float32; the maps divided by 255, as they
    are stored as 0..255)."""
    import nibabel as nib

    files = mni152_files()
    t1, gm, wm = (np.asarray(nib.load(files[k]).dataobj, dtype=np.float32) for k in ("t1", "gm", "wm"))
    if gm.max() > 1.5:
        gm, wm = gm / 255.0, wm / 255.0
    return t1, gm, wm


def mni152_volumes() -> tuple[np.ndarray, np.ndarray]:
    """The T1 volume (float32) and its tissue labels (0 background, 1 grey matter, 2 white matter).

    A voxel takes the larger tissue probability when that exceeds 0.5 inside the brain (T1 > 0), else background.
    """
    t1, gm, wm = mni152_maps()
    brain = t1 > 0
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[brain & (gm > 0.5) & (gm >= wm)] = 1
    labels[brain & (wm > 0.5) & (wm > gm)] = 2
    return t1, labels


def _square(a: np.ndarray) -> np.ndarray:
    """Zero-pad a 2D slice to a centred square."""
    h, w = a.shape
    s = max(h, w)
    out = np.zeros((s, s), dtype=a.dtype)
    out[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = a
    return out


def build_mni152_slices(root: Path, plane: Plane = "axial", min_brain_fraction: float = 0.1) -> Path:
    """Write MNI152 slices of one plane in the reference layout under ``root`` (atomically: all or nothing).

    Slices whose brain covers less than ``min_brain_fraction`` of the square are skipped. Splits interleave
    along the slice axis: every 8th slice is test, every 8th shifted by 4 is val, the rest train.

    Returns:
        ``root``, holding ``images/{train,val,test}/*.png``, ``masks/all/{train,val,test}/*.png`` and
        ``dataset.json`` (class names and provenance).
    """
    t1, labels = mni152_volumes()
    axis = PLANE_AXIS[plane]
    hi = float(np.percentile(t1[t1 > 0], 99.5))

    def write(tmp: Path) -> None:
        counts = {"train": 0, "val": 0, "test": 0}
        for k in range(t1.shape[axis]):
            img = _square(np.rot90(np.take(t1, k, axis=axis)))
            lab = _square(np.rot90(np.take(labels, k, axis=axis)))
            if (img > 0).mean() < min_brain_fraction:
                continue
            split = "test" if k % 8 == 0 else "val" if k % 8 == 4 else "train"
            name = f"mni152_{plane}_{k:03d}.png"
            save_png(tmp / "images" / split / name, (np.clip(img / hi, 0, 1) * 255).round().astype(np.uint8))
            save_png(tmp / "masks" / "all" / split / name, lab)
            counts[split] += 1
        save_json(
            tmp / "dataset.json",
            {"source": "nilearn MNI152 2009a symmetric template", "plane": plane, "classes": list(CLASS_NAMES),
             "splits": counts, "version": CACHE_VERSION},
        )

    return _build_folder(root, write)


class MNI152SliceDataModule(SegGuidedImageDataModule):
    """Demo data: MNI152 T1 slices with background / grey matter / white matter masks (3 classes).

    Built from the files nilearn ships into ``cache_dir`` on first use, then read through the reference layout.

    Args:
        plane: slicing plane.
        cache_dir: where built demo data is kept (default ``$MEDSYNTH_CACHE`` or ``~/.cache/medsynth``).
        num_classes: must be 3 (background, grey matter, white matter); 0 trains an unconditional model.
        image_size: side of the square slices in pixels.
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        random_flip: flip training slices left-right at random.
        num_samples: images sampled by ``predict`` when unconditional.
    """

    model_describing_args = ("num_classes", "image_size")
    data_location_args = ("cache_dir",)

    def __init__(
        self,
        plane: Plane = "axial",
        cache_dir: Optional[Path] = None,
        num_classes: NonNegativeInt = 3,
        image_size: PositiveInt = 64,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        random_flip: bool = True,
        num_samples: PositiveInt = 16,
    ) -> None:
        if num_classes not in (0, len(CLASS_NAMES)):
            raise DataError(f"data.num_classes={num_classes}: the MNI152 demo has {len(CLASS_NAMES)} classes (or 0)")
        self.root = Path(cache_dir or default_cache_dir()) / f"mni152_{plane}_{CACHE_VERSION}"
        super().__init__(
            img_dir=self.root / "images",
            seg_dir=self.root / "masks",
            seg_type="all",
            num_classes=num_classes,
            image_size=image_size,
            channels=1,
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            num_samples=num_samples,
        )
        self.plane = plane

    def prepare_data(self) -> None:
        if not (self.root / "dataset.json").is_file():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            build_mni152_slices(self.root, self.plane)

    def setup(self, stage: str) -> None:
        self.prepare_data()  # prepare_data runs on one rank only; make sure the cache exists everywhere
        super().setup(stage)


class MNI152PlaneDataModule(ClassImageDataModule):
    """Class demo: MNI152 T1 slices labelled by their anatomical plane (axial, coronal, sagittal).

    The slices of each plane are built from nilearn's files into ``cache_dir`` on first use (as for
    :class:`MNI152SliceDataModule`) and read as a class map whose folders hold ``train/``, ``val/``, ``test/``.

    Args:
        cache_dir: where built demo data is kept (default ``$MEDSYNTH_CACHE`` or ``~/.cache/medsynth``).
        image_size: side of the square slices in pixels.
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        samples_per_class: images ``predict`` samples of each plane.
    """

    model_describing_args = ("image_size",)
    data_location_args = ("cache_dir",)

    def __init__(
        self,
        cache_dir: Optional[Path] = None,
        image_size: PositiveInt = 64,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        samples_per_class: PositiveInt = 8,
    ) -> None:
        self.cache = Path(cache_dir or default_cache_dir())
        super().__init__(
            root=self.cache, image_size=image_size, channels=1, batch_size=batch_size, num_workers=num_workers,
            random_flip=False, samples_per_class=samples_per_class,
        )

    def _classes(self) -> tuple[list[str], list[Path]]:
        names = ["axial", "coronal", "sagittal"]
        return names, [self.cache / f"mni152_{p}_{CACHE_VERSION}" / "images" for p in names]

    def _class_files(self, label: int, split: str) -> list[Path]:
        return class_map_files(self.folders[label], split)

    def prepare_data(self) -> None:
        for plane, folder in zip(self.class_names, self.folders):
            if not (folder.parent / "dataset.json").is_file():
                self.cache.mkdir(parents=True, exist_ok=True)
                build_mni152_slices(folder.parent, plane)

    def setup(self, stage: str) -> None:
        self.prepare_data()
        super().setup(stage)


def downsample_volume(array: np.ndarray, affine: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3D volume to voxels ``factor`` times larger on every axis, keeping it where it was in the world.

    Trilinear interpolation (``align_corners=False``) at output voxel ``i`` reads input position
    ``factor * i + (factor - 1) / 2``; the affine is composed with that map, so world coordinates stay exact. At an
    integer factor of 2 this is the average of each 2x2x2 block; larger factors alias somewhat (no pre-filter).

    Args:
        array: ``(X, Y, Z)`` volume.
        affine: its ``(4, 4)`` voxel-to-world matrix.
        factor: new voxel size over old (>= 1; 1 returns the input).

    Returns:
        The ``(floor(X / factor), ...)`` float32 volume and its affine.
    """
    if factor == 1:
        return array.astype(np.float32), affine
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(t, scale_factor=1.0 / factor, mode="trilinear", align_corners=False,
                        recompute_scale_factor=False)[0, 0].numpy()
    index_map = np.diag([factor, factor, factor, 1.0])
    index_map[:3, 3] = (factor - 1.0) / 2.0
    return out, affine @ index_map


def _shifted(affine: np.ndarray, start: int, axis: int = 0) -> np.ndarray:
    """The affine of a sub-volume that starts at voxel ``start`` along ``axis``."""
    out = affine.copy()
    offset = np.zeros(3)
    offset[axis] = start
    out[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return out


def build_mni152_volumes(root: Path, resolution_mm: float = 2.0) -> Path:
    """Write the posterior and anterior halves of the MNI152 T1 as NIfTI volumes under ``root`` (atomically).

    The template is resampled to ``resolution_mm`` (:func:`downsample_volume`) and cut in the middle of its second
    (posterior-anterior) axis into ``posterior.nii.gz`` (split ``train``) and ``anterior.nii.gz`` (``val``), each
    with the affine that keeps it where it was. Validation patches are held-out anatomy (frontal lobes against
    occipital lobes and cerebellum); a left/right cut would not be, as the 2009a *symmetric* template is its own
    mirror image.

    Returns:
        ``root``, holding the two volumes, ``manifest.json`` (records with splits) and ``dataset.json``.
    """
    import nibabel as nib

    img = nib.load(mni152_files()["t1"])
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = float(np.linalg.norm(affine[:3, 0]))
    t1, affine = downsample_volume(t1, affine, resolution_mm / spacing)
    cut = t1.shape[1] // 2
    first, second = (t1[:, :cut], _shifted(affine, 0, 1)), (t1[:, cut:], _shifted(affine, cut, 1))
    halves = {"posterior": first, "anterior": second} if affine[1, 1] > 0 else {"posterior": second, "anterior": first}

    def write(tmp: Path) -> None:
        for name, (data, aff) in halves.items():
            out = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), aff)
            out.header.set_xyzt_units("mm")
            nib.save(out, tmp / f"{name}.nii.gz")
        save_json(tmp / "dataset.json", {
            "source": "nilearn MNI152 2009a symmetric template (T1)", "resolution_mm": resolution_mm,
            "shapes": {k: list(v[0].shape) for k, v in halves.items()}, "version": CACHE_VERSION,
        })
        save_json(tmp / "manifest.json", [{"image": "posterior.nii.gz", "split": "train"},
                                          {"image": "anterior.nii.gz", "split": "val"}])

    return _build_folder(root, write)


TISSUE_NAMES = ("background", "other_brain", "grey_matter", "white_matter")
"""The classes of the 3D demo's label maps (:func:`build_mni152_label_maps`)."""


def build_mni152_label_maps(root: Path, resolution_mm: float = 2.0) -> Path:
    """Write tissue label maps of the two halves :func:`build_mni152_volumes` writes, on the same grids (atomically).

    The T1 and the grey/white-matter probability maps are resampled alike (:func:`downsample_volume`), then each
    voxel is labelled 0 background (T1 = 0), 2 grey or 3 white matter (the larger probability, when above 0.5),
    else 1 other brain (CSF, deep structures): :data:`TISSUE_NAMES`.

    Returns:
        ``root``, holding ``posterior.nii.gz`` and ``anterior.nii.gz`` (uint8).
    """
    import nibabel as nib

    img = nib.load(mni152_files()["t1"])
    affine0 = np.asarray(img.affine, dtype=np.float64)
    factor = resolution_mm / float(np.linalg.norm(affine0[:3, 0]))
    (t1, affine), (gm, _), (wm, _) = (downsample_volume(v, affine0, factor) for v in mni152_maps())
    labels = np.zeros(t1.shape, np.uint8)
    labels[t1 > 0] = 1
    labels[(t1 > 0) & (gm > 0.5) & (gm >= wm)] = 2
    labels[(t1 > 0) & (wm > 0.5) & (wm > gm)] = 3
    cut = labels.shape[1] // 2
    first, second = (labels[:, :cut], _shifted(affine, 0, 1)), (labels[:, cut:], _shifted(affine, cut, 1))
    halves = {"posterior": first, "anterior": second} if affine[1, 1] > 0 else {"posterior": second, "anterior": first}

    def write(tmp: Path) -> None:
        for name, (data, aff) in halves.items():
            out = nib.Nifti1Image(np.ascontiguousarray(data), aff)
            out.header.set_xyzt_units("mm")
            nib.save(out, tmp / f"{name}.nii.gz")
        save_json(tmp / "dataset.json", {"source": "nilearn MNI152 2009a symmetric template (T1, GM, WM)",
                                         "classes": list(TISSUE_NAMES), "resolution_mm": resolution_mm,
                                         "version": CACHE_VERSION})

    return _build_folder(root, write)


def _build_folder(root: Path, write: Callable[[Path], None]) -> Path:
    """Build the folder ``root`` all or nothing: ``write`` fills a temporary sibling that then takes its name (when
    another process finished first, its folder is kept)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


class MNI152VolumeDataModule(VolumeDataModule):
    """3D demo data: patches of the MNI152 T1 template, its posterior half for training, anterior for validation.

    Built from the file nilearn ships into ``cache_dir`` on first use (:func:`build_mni152_volumes`), then read
    through its manifest like user data. At 2 mm each half is 98x58x94 voxels.

    Args:
        cache_dir: where built demo data is kept (default ``$MEDSYNTH_CACHE`` or ``~/.cache/medsynth``).
        resolution_mm: voxel size in mm the 1 mm template is resampled to (>= 1).
        patch_size: side in voxels of the cubic patches (at most 58 at 2 mm, 116 at 1 mm).
        percentiles: lower and upper percentiles (0..100) of the brain voxels mapped to -1 and 1.
        samples_per_volume: training patches drawn from the volume each time it is loaded.
        queue_length: patches the training queue holds.
        val_patches_per_volume: fixed validation patches from the anterior half.
        batch_size: patches per batch.
        num_workers: processes loading volumes.
        random_flip: flip training patches along each axis at random.
        random_rot90: turn training patches by quarter turns at random.
        predict_split: the volumes ``predict`` yields (``all``: both halves).
        tissue_labels: pair each half with its tissue label map (:data:`TISSUE_NAMES`, 4 classes) for mask-guided
            diffusion and a 3D segmenter (:func:`build_mni152_label_maps`).
    """

    model_describing_args = ("patch_size", "percentiles")
    data_location_args = ("cache_dir",)

    def __init__(
        self,
        cache_dir: Optional[Path] = None,
        resolution_mm: float = 2.0,
        patch_size: PositiveInt = 32,
        percentiles: tuple[float, float] = (0.5, 99.5),
        samples_per_volume: PositiveInt = 8,
        queue_length: PositiveInt = 64,
        val_patches_per_volume: PositiveInt = 4,
        batch_size: PositiveInt = 2,
        num_workers: NonNegativeInt = 2,
        random_flip: bool = True,
        random_rot90: bool = True,
        predict_split: Literal["all", "train", "val", "test"] = "all",
        tissue_labels: bool = False,
    ) -> None:
        if not resolution_mm >= 1.0:
            raise DataError(f"data.resolution_mm={resolution_mm}: the template is 1 mm; give 1 or more")
        self.resolution_mm = float(resolution_mm)
        self.root = Path(cache_dir or default_cache_dir()) / f"mni152_volumes_{CACHE_VERSION}_{resolution_mm:g}mm"
        super().__init__(
            manifest=self.root / "manifest.json", patch_size=patch_size, channels=1, normalization="mri",
            percentiles=percentiles, samples_per_volume=samples_per_volume, queue_length=queue_length,
            val_patches_per_volume=val_patches_per_volume, batch_size=batch_size, num_workers=num_workers,
            random_flip=random_flip, random_rot90=random_rot90, predict_split=predict_split,
        )
        self.tissue_labels = bool(tissue_labels)
        self.label_root = self.root.with_name(f"mni152_labels_{CACHE_VERSION}_{resolution_mm:g}mm")
        if self.tissue_labels:
            self.masks = self.label_root

    @property
    def class_names(self) -> Optional[list[str]]:
        """``None``: the demo volumes carry no class labels (known without building the cache)."""
        return None

    @property
    def num_classes(self) -> int:
        """4 with ``tissue_labels`` (:data:`TISSUE_NAMES`), else 0 (known without building the cache)."""
        return len(TISSUE_NAMES) if self.tissue_labels else 0

    def prepare_data(self) -> None:
        if not self.manifest.is_file():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            build_mni152_volumes(self.root, self.resolution_mm)
        if self.tissue_labels and not (self.label_root / "anterior.nii.gz").is_file():
            build_mni152_label_maps(self.label_root, self.resolution_mm)

    def setup(self, stage: str) -> None:
        self.prepare_data()  # prepare_data runs on one rank only; make sure the cache exists everywhere
        super().setup(stage)
