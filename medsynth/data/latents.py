"""Latents written by an autoencoder (``predict`` with ``predict_output: latent``), for latent diffusion.

A latent manifest (``latents.json``, written by :class:`~medsynth.writers.LatentWriter`) lists one
``.npy`` per encoded input with its split, class label, mask and source affine, the scaling to apply
(``(z - shift) * scale``) and the autoencoder that made them; for volumes also their intensity normalisation and
geometry. Its format is defined, and read and checked, in :mod:`medsynth.data.latent_manifest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset, default_collate

from medsynth.contracts import FromModel
from medsynth.data.base import MedsynthDataModule, resolve_listed_path, split_by_name
from medsynth.data.image2d import read_mask
from medsynth.data.latent_manifest import read_latent_manifest
from medsynth.data.manifest import load_json
from medsynth.data.volumes import read_label_map
from medsynth.diffusion.conditioning import reduce_to_grid
from medsynth.errors import DataError
from medsynth.io import read_npy


def random_crop(z: torch.Tensor, masks: dict, size: int, factor: int = 1) -> tuple[torch.Tensor, dict]:
    """A random cube of side ``size`` of a latent ``(C, *spatial)`` and the same window of its masks: ``mask`` on
    the latent grid ``(*spatial)``, ``full_mask`` at image resolution ``(*spatial * factor)``; ``None`` stays."""
    starts = [int(torch.randint(0, s - size + 1, ())) for s in z.shape[1:]]
    window = tuple(slice(a, a + size) for a in starts)
    fine = tuple(slice(a * factor, (a + size) * factor) for a in starts)
    out = {k: (v[fine if k == "full_mask" else window] if v is not None else None) for k, v in masks.items()}
    return z[(slice(None), *window)], out


class RandomSizeCrop:
    """Collates training latents cropped to one side drawn per batch from ``sizes`` (each crop at its own random
    place), so a net sees every latent size it is meant to generate; a picklable ``collate_fn``."""

    def __init__(self, sizes: list[int], factor: int = 1) -> None:
        self.sizes, self.factor = list(sizes), int(factor)

    def __call__(self, items: list[dict]) -> dict:
        size = self.sizes[int(torch.randint(0, len(self.sizes), ()))]
        out = []
        for item in items:
            masks = {k: item[k] for k in ("mask", "full_mask") if k in item}
            z, masks = random_crop(item["image"], masks, size, self.factor)
            out.append(dict(item, image=z.contiguous(), **{k: v.contiguous() for k, v in masks.items()}))
        return default_collate(out)


def is_label_volume(path: str | Path) -> bool:
    """Whether a mask file is a volume's label map (NIfTI) rather than a 2D mask (PNG, NPY, ...)."""
    return str(path).lower().endswith((".nii.gz", ".nii"))


def read_latent_mask(path: str | Path, num_classes: int) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """A latent's mask at image resolution, ``(*spatial)`` int64 in ``0..K-1``, and its affine (volumes only):
    a 2D mask (PNG, NPY; :func:`~medsynth.data.image2d.read_mask`) or a volume's label map (NIfTI;
    :func:`~medsynth.data.volumes.read_label_map`).

    Raises:
        DataError: one line naming the file (unreadable, non-integer, a label ``>= num_classes``).
    """
    if is_label_volume(path):
        labels, affine = read_label_map(path, num_classes)
        return torch.from_numpy(labels), affine
    return torch.from_numpy(read_mask(Path(path), num_classes).astype(np.int64)), None


def mask_on_latent_grid(mask: torch.Tensor, latent_shape: Sequence[int], factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask at image resolution ``(*spatial)`` put on the latent grid ``latent_shape``: each latent voxel takes
    the majority label of the ``factor``-sided block of image voxels it encodes (:func:`reduce_to_grid`).

    The encoder padded each image at the end of every axis to a multiple of its patch (background): a mask that
    fits inside ``latent_shape * factor`` is padded the same way (with 0) first. A mask of any other size is
    resized by nearest neighbour. Returns the latent-grid mask and the (padded) image-resolution mask.
    """
    full = [int(s) * int(factor) for s in latent_shape]
    if list(mask.shape) != full and all(m <= f for m, f in zip(mask.shape, full)):
        pad = [p for m, f in zip(reversed(mask.shape), reversed(full)) for p in (0, f - m)]
        mask = F.pad(mask, pad)
    if list(mask.shape) == full:
        return reduce_to_grid(mask, int(factor)), mask
    small = F.interpolate(mask[None, None].float(), size=tuple(latent_shape), mode="nearest")[0, 0].long()
    return small, mask


class LatentDataset(Dataset):
    """Scaled latents ``image`` ``(C, *spatial)`` (+ ``label``, + ``mask`` on the latent grid and ``full_mask``,
    the same window at image resolution ``(*spatial * factor)``), randomly cropped to ``crop_size`` and flipped
    when training.

    Uncropped items also carry ``image_mask`` (the mask at image resolution, padded as the encoder padded the
    image); volumes' label maps add ``affine`` and ``mask_path``, so samples are written in the label map's geometry.
    ``defer_crop`` leaves the latents whole for a collate function that crops each batch (:class:`RandomSizeCrop`).
    """

    def __init__(self, records: list[dict], shift: float, scale: float, crop_size: Optional[int] = None,
                 flip_axes: Sequence[int] = (), num_classes: int = 0, defer_crop: bool = False,
                 downsample_factor: int = 1, repeats: int = 1) -> None:
        self.records, self.shift, self.scale = records, shift, scale
        self.crop_size, self.flip_axes, self.num_classes = crop_size, tuple(flip_axes), num_classes
        self.defer_crop, self.downsample_factor, self.repeats = defer_crop, downsample_factor, int(repeats)

    def __len__(self) -> int:
        return len(self.records) * self.repeats  # each latent ``repeats`` times: its own crop and flips each time

    def __getitem__(self, index: int) -> dict:
        index = index % len(self.records)
        rec = self.records[index]
        raw = read_npy(rec["latent"], "latent")
        if raw.dtype.kind not in "biuf" or not np.isfinite(raw).all():
            raise DataError(f"{rec['latent']}: latent holds non-numeric, NaN or infinite values")
        z = (torch.from_numpy(raw.astype(np.float32)) - self.shift) * self.scale
        item: dict = {"index": index, "name": rec["name"]}
        mask = None
        if self.num_classes > 0:
            m, affine = read_latent_mask(rec["mask"], self.num_classes)
            if "image_shape" in rec and list(m.shape) != list(rec["image_shape"]):
                raise DataError(f"{rec['mask']}: mask of shape {list(m.shape)}, but its latent {rec['latent']} encodes "
                                f"an image of shape {list(rec['image_shape'])}")
            mask, m = mask_on_latent_grid(m, z.shape[1:], self.downsample_factor)
            full = m if list(m.shape) == [s * self.downsample_factor for s in mask.shape] else None
            if not self.crop_size and not self.defer_crop:
                item["image_mask"] = m  # at image resolution: what a sample decoded from this latent should follow
                if affine is not None:
                    item["affine"], item["mask_path"] = torch.from_numpy(affine), str(rec["mask"])
        masks = {"mask": mask, "full_mask": full} if mask is not None else {}
        if self.crop_size and not self.defer_crop:
            z, masks = random_crop(z, masks, self.crop_size, self.downsample_factor)
        for axis in self.flip_axes:  # spatial axes where a mirror image is still plausible anatomy
            if torch.rand(()) < 0.5:
                z = z.flip(axis + 1)
                masks = {k: v.flip(axis) if v is not None else None for k, v in masks.items()}
        item["image"] = z.contiguous()
        item.update({k: v.contiguous() for k, v in masks.items() if v is not None})
        if "label" in rec:
            item["label"] = rec["label"]
        return item


def list_label_maps(source: Path) -> list[Path]:
    """The label maps ``predict`` conditions on: the NIfTI files of a folder (sorted), or those a JSON manifest
    lists (paths, or records with a ``mask`` path; relative to the manifest's folder).

    Raises:
        DataError: a missing source or listed file, a malformed manifest, or no label maps.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if not p.name.startswith(".") and is_label_volume(p))
    elif source.is_file():
        raw = load_json(source, "label-map manifest")
        if not isinstance(raw, list):
            raise DataError(f"{source}: label-map manifest must be a list of paths or of records with a 'mask'")
        files = []
        for i, entry in enumerate(raw):
            rel = entry.get("mask") if isinstance(entry, dict) else entry
            file = resolve_listed_path(source, rel, f"record {i} mask")
            if not file.is_file():
                raise DataError(f"{source}: record {i} label map {file} does not exist")
            files.append(file)
    else:
        raise DataError(f"data.predict_masks={source}: no such folder or manifest of label maps")
    if not files:
        raise DataError(f"data.predict_masks={source}: no label maps (.nii.gz/.nii) to condition on")
    return files


def padded_side(side: int, multiple: int) -> int:
    """``side`` rounded up to a multiple of ``multiple``."""
    return -(-int(side) // int(multiple)) * int(multiple)


class LabelMapDataset(Dataset):
    """Label maps to sample on (one sample each): ``mask`` on the latent grid, ``full_mask`` at image resolution
    padded like the latent grid, ``image_mask`` at image resolution (unpadded: samples are cropped back to it), their ``affine``, ``mask_path``, ``name`` (the file name without its
    suffix) and ``index``.

    Each label map is padded at the end of every axis with background to a multiple of ``multiple`` voxels (as the
    encoder padded the training volumes), then put on the latent grid.

    Args:
        files: NIfTI label maps (see :func:`list_label_maps`).
        num_classes: ``K``: labels must lie in ``0..K-1``.
        downsample_factor: the autoencoder's downsampling factor per axis (1 in pixel space).
        multiple: sides are padded to a multiple of this (a multiple of ``downsample_factor``).
    """

    def __init__(self, files: Sequence[Path], num_classes: int, downsample_factor: int = 1,
                 multiple: Optional[int] = None) -> None:
        self.files, self.num_classes, self.factor = list(files), num_classes, int(downsample_factor)
        self.multiple = int(multiple or downsample_factor)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        """The checked label map ``(X, Y, Z)`` and its affine."""
        labels, affine = read_latent_mask(self.files[index], self.num_classes)
        if affine is None or labels.ndim != 3:
            raise DataError(f"{self.files[index]}: not a 3D label map")
        return labels, affine

    def __getitem__(self, index: int) -> dict:
        labels, affine = self.read(index)
        latent = [padded_side(s, self.multiple) // self.factor for s in labels.shape]
        mask, full = mask_on_latent_grid(labels, latent, self.factor)
        name = self.files[index].name
        name = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
        return {"index": index, "name": name, "mask": mask, "full_mask": full, "image_mask": labels,
                "affine": torch.from_numpy(affine), "mask_path": str(self.files[index])}


class GenerationDataset(Dataset):
    """The inputs of latent sampling: ``num`` items per class (or ``num`` in all), each a name and index."""

    def __init__(self, num: int, class_names: Optional[list[str]]) -> None:
        self.labels = [label for label in range(len(class_names)) for _ in range(num)] if class_names else [None] * num
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = self.labels[index]
        item = {"index": index, "name": f"sample_{index:05d}"}
        if label is not None:
            item["label"] = label
            item["folder"] = self.class_names[label]
        return item


class LatentDataModule(MedsynthDataModule):
    """Latents of images or volumes (from ``latents.json``) for latent diffusion, with class labels or masks.

    Training reads the scaled latents (``(z - shift) * scale``), randomly cropped to ``crop_size`` latent voxels
    (or whole, when all latents share a shape). ``predict`` samples ``num_samples`` latents per class (or in all,
    unlabelled), or one per mask of ``predict_split`` for mask-guided models; the model decodes them with the
    autoencoder named in the manifest.

    Args:
        manifest: the latent manifest ``latents.json`` written by ``medsynth predict --config configs/encode3d.yaml``
            (or the 2D encoding recipe).
        num_classes: mask classes counting background for mask-guided latent diffusion (masks are taken to the
            latent grid by majority, and kept at image resolution); 0 ignores masks; ``null`` takes the count the
            latent manifest records (written when volumes were encoded with their label maps).
        crop_size: side in latent voxels of random training crops; a list of sides crops each training batch to
            one of them, drawn at random, so BiFlowNet's resolution embedding and sub-volume positions learn every
            size in the list (generate at those sizes); validation uses the largest. ``None`` trains on whole
            latents (they must share a shape).
        crops_per_latent: training items each latent gives per epoch, each with its own random crop and flips:
            with a few large latents (a handful of volumes), it fills batches that would otherwise hold one crop
            per volume.
        val_fraction: share of latents without a split that validate (chosen by a hash of the name).
        batch_size: latents per batch (per device).
        num_workers: DataLoader worker processes.
        flip_axes: spatial axes (0-based) along which training latents (and masks) are mirrored at random, for
            data whose mirror image is still plausible: e.g. ``[1]`` (left-right) for 2D slices shown as usual,
            ``[0]`` for RAS-oriented volumes; default none (anatomy has a top and a front).
        num_samples: latents ``predict`` samples per class (class-conditional) or in all.
        output_shape: spatial shape in image voxels of generated images/volumes (each side a multiple of the
            autoencoder's downsampling factor); default: the training latents' shape (the crop, if cropping).
        spacing: voxel spacing in mm written into generated NIfTI volumes; default: the source volumes' spacing
            (from their affines) when they all agree, else 1 mm.
        predict_split: the split whose masks condition sampling (mask-guided models).
        predict_masks: a folder of NIfTI label maps, or a JSON list of their paths, that ``predict`` conditions
            on instead (mask-guided volume models): one sample per label map, of its shape (each side a multiple
            padded as ``predict_mask_multiple`` says), written with its affine as ``samples/NAME.nii.gz`` beside
            a copy ``masks/NAME.nii.gz``.
        predict_mask_multiple: label maps of ``predict_masks`` are padded at the end (background) to a multiple of
            this many voxels per side before sampling, and samples cropped back to the label map's shape: a
            multiple of the autoencoder's downsampling factor whose latent sides the net can denoise (BiFlowNet:
            multiples of its sub-volume side); default the downsampling factor.
    """

    model_describing_args = ("num_classes",)
    data_location_args = ("manifest",)

    def __init__(
        self,
        manifest: Optional[Path] = None,
        num_classes: Optional[NonNegativeInt] = 0,
        crop_size: Optional[int | list[int]] = None,
        crops_per_latent: PositiveInt = 1,
        val_fraction: float = 0.1,
        batch_size: PositiveInt = 4,
        num_workers: NonNegativeInt = 2,
        flip_axes: Optional[list[int]] = None,
        num_samples: PositiveInt = 4,
        output_shape: Optional[list[PositiveInt]] = None,
        spacing: Optional[list[float]] = None,
        predict_split: Literal["train", "val", "test"] = "test",
        predict_masks: Optional[Path] = None,
        predict_mask_multiple: Optional[PositiveInt] = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and (num_classes < 0 or num_classes == 1):
            raise DataError(f"data.num_classes={num_classes}: use 0 (no masks) or >= 2 (counting background)")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        if spacing is not None and (len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing)):
            raise DataError(f"data.spacing={list(spacing)}: give three positive voxel sides in mm")
        self.save_hyperparameters(logger=False)  # logged under "data" by the CLI (cli.LogDataSettings)
        self.manifest = Path(manifest) if manifest is not None else None
        self._num_classes = num_classes
        self.predict_masks = Path(predict_masks) if predict_masks is not None else None
        self.predict_mask_multiple = predict_mask_multiple
        sizes = sorted({int(c) for c in crop_size}) if isinstance(crop_size, (list, tuple)) else (
            [int(crop_size)] if crop_size else [])
        if any(c < 1 for c in sizes):
            raise DataError(f"data.crop_size={crop_size}: crop sides must be positive")
        self.crop_sizes = sizes
        self.crop_size = sizes[-1] if sizes else None  # the largest: validation crops, the default sample shape
        self.crops_per_latent = int(crops_per_latent)
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.flip_axes = list(flip_axes or [])
        self.num_samples = num_samples
        self.output_shape = list(output_shape) if output_shape else None
        self.spacing = list(spacing) if spacing else None
        self.predict_split = predict_split
        self._info: Optional[dict] = None
        self._model_class_names: Optional[list[str]] = None

    # -- the manifest

    @property
    def info(self) -> dict:
        """The checked latent manifest (read once)."""
        if self._info is None:
            if self.manifest is None:
                raise DataError("data.manifest is not set: give the latents.json written by the encoding step")
            self._info = read_latent_manifest(self.manifest)
        return self._info

    @property
    def num_classes(self) -> int:
        """Mask classes counting background (0: no masks): ``data.num_classes``, or the manifest's count when null."""
        if self._num_classes is not None:
            return int(self._num_classes)
        recorded = self.info.get("num_classes")
        if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 2:
            raise DataError(f"{self.manifest}: data.num_classes is null (take it from the latents) but the manifest "
                            "records no mask classes: encode the volumes with their label maps (data.masks)")
        return recorded

    @property
    def downsample_factor(self) -> int:
        return int(self.info["autoencoder"].get("downsample_factor") or 1)

    def predict_label_maps(self) -> LabelMapDataset:
        """The checked label maps of ``predict_masks`` (every file read once now: one line on the first bad one)."""
        if self.num_classes == 0:
            raise DataError(f"data.predict_masks={self.predict_masks}: this model is not mask-guided "
                            "(data.num_classes=0)")
        dataset = LabelMapDataset(list_label_maps(self.predict_masks), self.num_classes, self.downsample_factor,
                                  self.mask_multiple())
        shapes = {tuple(dataset.read(i)[0].shape) for i in range(len(dataset))}
        if len(shapes) > 1 and self.batch_size > 1:
            raise DataError(f"data.predict_masks={self.predict_masks}: label maps of different shapes "
                            f"{sorted(shapes)[:2]} cannot share a batch; use --data.batch_size 1")
        return dataset

    def mask_multiple(self) -> int:
        """What ``predict_masks`` label maps are padded to a multiple of (checked against the downsampling)."""
        factor = self.downsample_factor
        multiple = int(self.predict_mask_multiple or factor)
        if multiple % factor:
            raise DataError(f"data.predict_mask_multiple={multiple}: must be a multiple of the autoencoder's "
                            f"downsampling factor {factor}")
        return multiple

    @property
    def class_names(self) -> Optional[list[str]]:
        if self.manifest is None:  # generating without latents: the model's classes (model_args adopts them)
            return self._model_class_names
        names = self.info.get("class_names")
        labels = [r["label"] for r in self.info["records"] if "label" in r]
        if names is None and labels:
            names = [str(i) for i in range(max(labels) + 1)]
        return list(names) if names else None

    def records(self, split: str) -> list[dict]:
        out = [r for r in self.info["records"] if r.get("split") or split_by_name(r["name"], self.val_fraction)]
        out = [r for r in out if (r.get("split") or split_by_name(r["name"], self.val_fraction)) == split]
        if split == "val" and not out:  # a tiny set without explicit splits: validate on the training latents
            out = self.records("train")
        if not out:
            raise DataError(f"{self.manifest}: empty split '{split}': no latents")
        if self.num_classes > 0:
            for r in out:
                if not r.get("mask"):
                    raise DataError(f"{self.manifest}: latent '{r['name']}' has no mask but data.num_classes="
                                    f"{self.num_classes} asks for masks")
        return out

    def latent_shape(self) -> list[int]:
        """Spatial shape of the latents the model learns (the crop, or the common whole shape)."""
        shapes = {tuple(r["shape"][1:]) for r in self.info["records"]}
        dims = len(next(iter(shapes)))
        if self.crop_size:
            small = [s for s in shapes if min(s) < self.crop_size]
            if small:
                raise DataError(f"{self.manifest}: data.crop_size={self.crop_size} is larger than a latent of shape "
                                f"{list(small[0])}")
            return [self.crop_size] * dims
        if len(shapes) > 1:
            raise DataError(f"{self.manifest}: latents of different shapes {sorted(shapes)[:2]}; set data.crop_size")
        return list(next(iter(shapes)))

    def sample_shape(self) -> list[int]:
        """Spatial latent shape that ``predict`` samples: ``output_shape`` / factor, the label maps' of
        ``predict_masks`` (when they share one), else the training shape."""
        factor = int(self.info["autoencoder"].get("downsample_factor", 1))
        if self.predict_masks is not None and self.output_shape is None:
            shapes = {tuple(_header_shape(f)) for f in _try_list(self.predict_masks)}
            if len(shapes) == 1 and None not in next(iter(shapes)):
                return [padded_side(s, self.mask_multiple()) // factor for s in next(iter(shapes))]
        if self.output_shape is None:
            return self.latent_shape()
        bad = [s for s in self.output_shape if s % factor]
        if bad or len(self.output_shape) != len(self.latent_shape()):
            raise DataError(f"data.output_shape={self.output_shape}: give {len(self.latent_shape())} sides, each a "
                            f"multiple of the autoencoder's downsampling factor {factor}")
        return [s // factor for s in self.output_shape]

    def voxel_spacing(self) -> list[float]:
        if self.spacing:
            return self.spacing
        spacings = {tuple(round(float(np.linalg.norm(np.asarray(r["affine"])[:3, i])), 4) for i in range(3))
                    for r in self.info["records"] if "affine" in r}
        return list(next(iter(spacings))) if len(spacings) == 1 else [1.0, 1.0, 1.0]

    def voxel_orientation(self) -> tuple[list[list[float]], list[float]]:
        """The source volumes' axis directions (the unit columns of their affines) and origin, for generated
        volumes: each where all sources agree, else identity directions and origin 0 (generated volumes have no
        position of their own; the directions keep viewers showing them the right way round)."""
        affines = [np.asarray(r["affine"], dtype=np.float64) for r in self.info["records"] if "affine" in r]
        if not affines:
            return np.eye(3).tolist(), [0.0, 0.0, 0.0]
        dirs = {tuple(np.round(a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0), 4).ravel()) for a in affines}
        origins = {tuple(np.round(a[:3, 3], 4)) for a in affines}
        direction = np.reshape(next(iter(dirs)), (3, 3)) if len(dirs) == 1 else np.eye(3)
        origin = list(next(iter(origins))) if len(origins) == 1 else [0.0, 0.0, 0.0]
        return direction.tolist(), [float(v) for v in origin]

    def model_args(self) -> dict:
        """What the model must know about these latents (linked into the model's arguments by the CLI).

        Without a manifest (generating from a model that knows its latent space, e.g. an imported one) only the
        generation settings come from here; see :meth:`_model_args_without_manifest`.
        """
        if self.manifest is None:
            return self._model_args_without_manifest()
        info, ae, scaling = self.info, self.info["autoencoder"], self.info["scaling"]
        shape = self.latent_shape()
        direction, origin = self.voxel_orientation()
        return {
            "num_classes": self.num_classes, "image_channels": int(info["records"][0]["shape"][0]),
            "image_size": int(shape[0]), "class_names": self.class_names, "output": "image",
            "sample_shape": self.sample_shape(),
            "latent_space": {"autoencoder": ae.get("checkpoint"), "autoencoder_sha256": ae.get("sha256"),
                             "method": scaling.get("method", "minmax"),  # bounds sampling (DiffusionModule.bounded)
                             "shift": float(scaling["shift"]), "scale": float(scaling["scale"]),
                             "latent_channels": ae.get("latent_channels"),
                             "downsample_factor": ae.get("downsample_factor"),
                             "spacing": self.voxel_spacing(),
                             "direction": direction, "origin": origin,
                             # how the encoded volumes were scaled: generated volumes are written back in their
                             # units (absent from manifests written before it was recorded)
                             **({"intensity": info["intensity"]} if isinstance(info.get("intensity"), dict) else {})},
        }

    # -- generating without a manifest

    def _model_args_without_manifest(self) -> dict:
        """The data's part when there are no latents to describe: the model's latent space, channels, size and
        classes stand (:class:`~medsynth.contracts.FromModel`); the data gives the output size (``output_shape``
        in the model's latent voxels), the spacing of the written volumes, and generates for the model's classes.

        Raises:
            DataError: (at linking) the model knows no latent space to generate in, or the output size does not fit
                its downsampling factor.
        """
        return {"num_classes": self.num_classes, "output": "image",
                "image_channels": FromModel(), "image_size": FromModel(),
                "class_names": FromModel(self._adopt_class_names),
                "sample_shape": FromModel(self._adopt_sample_shape),
                "latent_space": FromModel(self._adopt_latent_space)}

    def _model_latent_space(self, model: dict) -> dict:
        space = model.get("latent_space")
        if not space:
            raise DataError("data.manifest is not set: give the latents.json written by the encoding step (only a "
                            "model that knows its latent space, e.g. a 3D MedDiffusion BiFlowNet imported with "
                            "--autoencoder, generates without one)")
        return space

    def _adopt_class_names(self, model: dict) -> Optional[list[str]]:
        self._model_class_names = list(model["class_names"]) if model.get("class_names") else None
        return self._model_class_names

    def _adopt_sample_shape(self, model: dict) -> list[int]:
        space, shape = self._model_latent_space(model), model.get("sample_shape")
        if self.output_shape is None:
            if not shape:
                raise DataError("data.output_shape is not set and the model records no sample shape: give the "
                                "size of the volumes to generate, e.g. --data.output_shape [64,64,64]")
            return list(shape)
        factor = space.get("downsample_factor")
        if not factor:
            raise DataError(f"data.output_shape={self.output_shape}: the model's latent space records no "
                            "downsampling factor to convert it with; give the latent manifest (data.manifest)")
        dims = len(shape) if shape else len(self.output_shape)
        if len(self.output_shape) != dims or any(s % int(factor) for s in self.output_shape):
            raise DataError(f"data.output_shape={self.output_shape}: give {dims} sides, each a multiple of the "
                            f"autoencoder's downsampling factor {factor}")
        return [s // int(factor) for s in self.output_shape]

    def _adopt_latent_space(self, model: dict) -> dict:
        space = self._model_latent_space(model)
        return {**space, "spacing": list(self.spacing)} if self.spacing else space

    # -- datasets

    def training_shapes(self) -> list[list[int]]:
        """The latent shapes training batches take (one per crop size, or the whole latents')."""
        dims = len(self.latent_shape())
        return [[c] * dims for c in self.crop_sizes] if self.crop_sizes else [self.latent_shape()]

    def _dataset(self, split: str, train: bool = False) -> LatentDataset:
        s = self.info["scaling"]
        return LatentDataset(self.records(split), float(s["shift"]), float(s["scale"]), self.crop_size,
                             flip_axes=self.flip_axes if train else (), num_classes=self.num_classes,
                             defer_crop=train and len(self.crop_sizes) > 1,
                             downsample_factor=self.downsample_factor,
                             repeats=self.crops_per_latent if train else 1)

    def setup(self, stage: str) -> None:
        if self.manifest is None and stage == "predict" and not self.num_classes:  # generating: no latents to check
            return super().setup(stage)
        dims = len(self.latent_shape())  # shapes agree (or a crop is given) before anything runs
        bad = [a for a in self.flip_axes if not 0 <= a < dims]
        if bad:
            raise DataError(f"data.flip_axes={self.flip_axes}: these latents have spatial axes 0..{dims - 1}")
        super().setup(stage)

    def dataset(self, split: str) -> Dataset:
        if split != "predict":
            return self._dataset(split, train=split == "train")
        if self.predict_masks is not None:
            return self.predict_label_maps()
        if self.num_classes > 0:
            return self._dataset(self.predict_split)
        return GenerationDataset(self.num_samples, self.class_names)

    def collate_fn(self, split: str):
        """Training crops every batch to one of the crop sizes (:class:`RandomSizeCrop`) when several are given."""
        deferred = getattr(self.datasets[split], "defer_crop", False)
        return RandomSizeCrop(self.crop_sizes, self.downsample_factor) if deferred else None


def _try_list(source: Path) -> list[Path]:
    """The label maps of ``source``, or none when it cannot be listed (the dataset then says why, in one line)."""
    try:
        return list_label_maps(source)
    except DataError:
        return []


def _header_shape(path: Path) -> tuple:
    """A NIfTI file's spatial shape from its header alone (``(None,)`` when unreadable: checked later)."""
    try:
        import nibabel as nib

        return tuple(int(s) for s in nib.load(str(path)).shape[:3])
    except Exception:  # noqa: BLE001 - the dataset reads and refuses it with one line
        return (None,)
