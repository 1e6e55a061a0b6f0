"""Writing predictions to disk: samples, their conditioning masks, a grid, and metadata."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Optional

import diffusers
import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

import medsynth
from medsynth.data.latent_manifest import LATENT_MANIFEST, LatentRecord, latent_manifest, latent_scaling
from medsynth.data.volumes import Normalization
from medsynth.io import save_json, save_nifti, save_npy, save_png
from medsynth.provenance import file_sha256, nifti_descrip, png_text, sidecar
from medsynth.visual import colorize_mask, make_grid, orthogonal_slices, pad_to, to_uint8


def generated_affine(latent_space: dict) -> np.ndarray:
    """The affine of a generated volume: the sources' axis directions scaled by the voxel spacing, and their
    origin (see ``LatentDataModule.voxel_orientation``); identity directions for models that predate them."""
    affine = np.eye(4)
    direction = np.asarray(latent_space.get("direction") or np.eye(3), dtype=np.float64)
    affine[:3, :3] = direction * np.asarray(latent_space.get("spacing") or [1.0, 1.0, 1.0], dtype=np.float64)
    affine[:3, 3] = latent_space.get("origin") or [0.0, 0.0, 0.0]
    return affine


def save_volume(path: Path, x: np.ndarray, affine: np.ndarray, descrip: str) -> None:
    """A volume ``(C, X, Y, Z)`` as float32 NIfTI: one channel as ``(X, Y, Z)``, several channels last."""
    array = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    save_nifti(path, np.asarray(array, dtype=np.float32), affine, descrip=descrip)


def save_label_map(folder: Path, stem: str, mask: np.ndarray, affine: Optional[np.ndarray], descrip: str,
                   text: Optional[dict] = None) -> str:
    """A label map beside its image: a volume's ``(X, Y, Z)`` as NIfTI with the image's affine, a 2D mask as PNG
    (with ``text`` marks); uint8, or uint16 from 256 classes. Returns its path relative to ``folder``'s parent."""
    mask = mask.astype(np.uint8 if mask.max() < 256 else np.uint16)
    if mask.ndim == 3:
        save_nifti(folder / f"{stem}.nii.gz", mask, affine if affine is not None else np.eye(4), descrip=descrip)
        return f"{folder.name}/{stem}.nii.gz"
    save_png(folder / f"{stem}.png", mask, text=text)
    return f"{folder.name}/{stem}.png"


def mask_slices(mask: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal mid-slices of a label map ``(X, Y, Z)``, coloured, laid out as
    :func:`~medsynth.visual.orthogonal_slices` lays out a volume's (so grids put a mask above its sample)."""
    x, y, z = (s // 2 for s in mask.shape)
    views = [colorize_mask(np.rot90(s)) for s in (mask[x, :, :], mask[:, y, :], mask[:, :, z])]
    size = max(max(v.shape[:2]) for v in views)
    return [pad_to(np.ascontiguousarray(v), size) for v in views]


def in_source_units(sample: torch.Tensor, latent_space: Optional[dict]) -> tuple[torch.Tensor, Optional[str]]:
    """A generated volume in [-1, 1] mapped back to the units of the volumes the latents were encoded from (HU for
    CT), with the intensity scaling the latent manifest recorded (``latent_space["intensity"]``, see
    ``Normalization.describe``); unchanged, with ``None`` units, for models whose latents predate that record.

    Returns:
        The float32 volume and its units (``HU``, ``arbitrary (the scanner's)``, or ``None``: still in [-1, 1]).
    """
    intensity = (latent_space or {}).get("intensity") or {}
    if "low" not in intensity or "high" not in intensity:
        return sample.float(), None
    return Normalization.from_unit(sample, float(intensity["low"]), float(intensity["high"])), intensity.get("units")


def run_metadata(trainer, pl_module, entries: dict, config: Optional[dict]) -> dict:
    """The ``metadata.json`` of an output folder: ``synthetic: true``, ``entries``, and how it was made (world
    size, precision, model class, versions, date, the resolved run ``config``)."""
    return {
        "synthetic": True,
        **entries,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "model": type(pl_module).__name__,
        "versions": {"medsynth": medsynth.__version__, "torch": torch.__version__,
                     "lightning": lightning.__version__, "diffusers": diffusers.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
    }


class SampleWriter(BasePredictionWriter):
    """Writes each generated image as PNG (8-bit view) and NPY (exact float values in [-1, 1]).

    Layout under ``output_dir``::

        samples/NAME.nii.gz                  # volumes (3D latent diffusion): float32 NIfTI in the source volumes'
                                             # units (HU for CT; see in_source_units), spacing from the model
        samples/NAME.png, samples/NAME.npy   # NAME: the conditioning mask's file stem (or sample_00000);
                                             # all channels in the NPY (multi-channel images, soft masks)
        samples/NAME.json                    # provenance sidecar of the NPY (PNGs carry it in text chunks)
        CLASS/sample_00000.png, .npy         # class-conditional models: a folder per class name
        masks/NAME.png                       # the conditioning (or generated) mask, as integer labels
        grid.png                             # masks (coloured) above their samples, or a row per class
        metadata.json                        # synthetic: true, checkpoint + SHA-256, resolved config, sampler,
                                             # seed, versions, date

    Every file is written atomically.

    Args:
        output_dir: destination folder.
        grid_size: samples shown in the grid.
        grid_columns: samples per grid row (each row of samples sits under a row of its masks).
        metadata: extra entries for ``metadata.json`` (checkpoint path, seed, ...).
        config: the run's resolved config (``medsynth predict``'s), recorded in ``metadata.json`` and every sidecar.
    """

    def __init__(self, output_dir: str | os.PathLike, grid_size: int = 16, grid_columns: int = 8,
                 metadata: Optional[dict] = None, config: Optional[dict] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.config = config
        self.grid_size = grid_size
        self.grid_columns = grid_columns
        self.metadata = dict(metadata or {})
        self._grid: list[tuple[Optional[int], Optional[np.ndarray], np.ndarray]] = []  # (label, mask, sample)
        self._count = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        self._grid, self._count, self._units, self._masks = [], 0, None, {}
        ckpt = self.metadata.get("checkpoint")
        self._sha = file_sha256(ckpt) if ckpt and Path(ckpt).is_file() else None
        self._seed = getattr(pl_module, "sample_seed", None)

    def _save_sample_array(self, path: Path, sample, index: int) -> None:
        save_npy(path, sample.numpy().astype(np.float32))
        save_json(path.with_suffix(".json"), sidecar(self._sha, self._seed, index, config=self.config))

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0):
        masks, labels = prediction.get("mask"), prediction.get("label")
        generated = prediction.get("generated_mask")
        folders = prediction.get("folder") or ["samples"] * len(prediction["name"])
        for i, (name, sample) in enumerate(zip(prediction["name"], prediction["sample"])):
            stem, folder = Path(name).stem, self.output_dir / folders[i]
            index = int(prediction["index"][i])
            mark = png_text(self._sha, self._seed, index)
            if sample.ndim == 4:
                save_json(folder / f"{stem}.json", sidecar(self._sha, self._seed, index, config=self.config))
            else:
                self._save_sample_array(folder / f"{stem}.npy", sample, index)
            if generated is not None:  # a mask generator: the label map is the result
                mask = generated[i].numpy()
                save_png(self.output_dir / "masks" / f"{stem}.png", mask.astype(np.uint8), text=mark)
                if len(self._grid) < self.grid_size:
                    self._grid.append((None, None, colorize_mask(mask)))
                self._count += 1
                continue
            affine = None
            if sample.ndim == 4 and masks is not None and masks[i].ndim == 3:  # drop padding the label map had
                sample = sample[(slice(None), *(slice(0, int(s)) for s in masks[i].shape))]
            if sample.ndim == 4:  # a volume (C, X, Y, Z): NIfTI with the model's voxel spacing and orientation
                latent_space = getattr(pl_module, "latent_space", None) or {}
                volume, self._units = in_source_units(sample, latent_space)
                # conditioned on a label map: the label map's geometry, so the sample overlays it
                affine = (prediction["affine"][i].double().numpy() if "affine" in prediction
                          else generated_affine(latent_space))
                save_volume(folder / f"{stem}.nii.gz", volume.numpy(), affine, nifti_descrip("sample"))
                view = np.concatenate(orthogonal_slices(sample), axis=1)
            else:
                view = to_uint8(sample)
                save_png(folder / f"{stem}.png", view, text=mark)
            mask_view = None
            if masks is not None:
                mask = masks[i].numpy()
                synthetic_mask = bool(prediction["synthetic_mask"][i]) if "synthetic_mask" in prediction else False
                # a volume's label map with the sample's geometry; a user's own 2D mask is not marked synthetic
                save_label_map(self.output_dir / "masks", stem, mask, affine, "medsynth conditioning label map",
                               text=mark if synthetic_mask else None)
                mask_view = np.concatenate(mask_slices(mask), axis=1) if mask.ndim == 3 else colorize_mask(mask)
                if "mask_path" in prediction:
                    self._masks[stem] = str(prediction["mask_path"][i])
            row = int(labels[i]) if labels is not None else None
            if sum(1 for r, _, _ in self._grid if r == row) < (self.grid_columns if row is not None else self.grid_size):
                self._grid.append((row, mask_view, view))
            self._count += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        total = int(trainer.strategy.reduce(torch.tensor(float(self._count)), reduce_op="sum"))  # every rank calls
        if not trainer.is_global_zero:
            return
        if self._grid:
            rows = []
            if self._grid[0][0] is not None:  # class-conditional: one row per class
                for label in sorted({r for r, _, _ in self._grid}):
                    rows.append([v for r, _, v in self._grid if r == label])
            else:
                for start in range(0, len(self._grid), self.grid_columns):
                    chunk = self._grid[start : start + self.grid_columns]
                    if chunk[0][1] is not None:
                        rows.append([m for _, m, _ in chunk])
                    rows.append([v for _, _, v in chunk])
            save_png(self.output_dir / "grid.png", make_grid(rows), text=png_text(self._sha, self._seed, -1))
        sampler = getattr(pl_module, "sampler", None)
        save_json(
            self.output_dir / "metadata.json",
            run_metadata(trainer, pl_module, {
                **self.metadata,
                "checkpoint_sha256": self._sha,
                "sampler": sampler.describe() if sampler is not None else None,
                "seed": getattr(pl_module, "sample_seed", None),
                "guidance_scale": (pl_module.guidance_weight() if hasattr(pl_module, "guidance_weight")
                                   else getattr(pl_module, "guidance_scale", None)),
                **({"guidance_setting": "auto"} if getattr(pl_module, "guidance_scale", None) == "auto" else {}),
                **({"intensity": (getattr(pl_module, "latent_space", None) or {}).get("intensity")}
                   if self._units else {}),
                "class_names": getattr(pl_module, "class_names", None),
                # sample name -> the label map it was conditioned on (this rank's, under DDP)
                **({"conditioning_masks": self._masks} if self._masks else {}),
                "num_samples": total,
                "grid_from": "rank 0's samples" if trainer.world_size > 1 else "all samples",
            }, self.config),
        )


class ReconstructionWriter(BasePredictionWriter):
    """Writes autoencoder reconstructions, one file per input, named after it.

    Layout under ``output_dir``::

        NAME.nii.gz, NAME.json    # 3D: the input's shape and affine, intensities mapped back to the input's units
                                  # (the data's normalisation inverted); header descrip marks it synthetic
        NAME.png, NAME.npy, NAME.json   # 2D: 8-bit view, exact values in [-1, 1], provenance sidecar
        metadata.json             # synthetic: true, checkpoint + SHA-256, resolved config, versions, date

    Every file is written atomically.

    Args:
        output_dir: destination folder.
        metadata: extra entries for ``metadata.json`` (checkpoint path, ...).
        config: the run's resolved config (``medsynth predict``'s), recorded in ``metadata.json`` and every sidecar.
    """

    def __init__(self, output_dir: str | os.PathLike, metadata: Optional[dict] = None,
                 config: Optional[dict] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.metadata = dict(metadata or {})
        self.config = config
        self._count = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        self._count = 0
        ckpt = self.metadata.get("checkpoint")
        self._sha = file_sha256(ckpt) if ckpt and Path(ckpt).is_file() else None

    @staticmethod
    def _stem(name: str) -> str:
        """A file name without its image/volume suffix; other names (volume names such as a DICOM series folder's
        ``1.2.840.113619.2.55``) are kept whole, since a dot there is not a suffix."""
        for ext in (".nii.gz", ".nii", ".png", ".npy", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nrrd", ".nhdr",
                    ".mha", ".mhd"):
            if name.lower().endswith(ext):
                return name[: -len(ext)]
        return Path(name).name

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0):
        recon = prediction["reconstruction"]  # (B, C, *spatial) in [-1, 1]
        for i in range(recon.shape[0]):
            stem = self._stem(str(prediction["name"][i]))
            index = int(prediction["index"][i]) if "index" in prediction else self._count
            source = str(prediction["path"][i]) if "path" in prediction else None
            x = recon[i]
            if "norm_low" in prediction and "norm_high" in prediction:
                x = Normalization.from_unit(x, float(prediction["norm_low"][i]), float(prediction["norm_high"][i]))
            x = x.numpy().astype(np.float32)
            extra = {"source": source, "kind": "autoencoder reconstruction"}
            if x.ndim == 4:  # a volume (C, X, Y, Z)
                affine = prediction["affine"][i].numpy() if "affine" in prediction else np.eye(4)
                save_volume(self.output_dir / f"{stem}.nii.gz", x, affine, nifti_descrip("reconstruction"))
            else:
                save_npy(self.output_dir / f"{stem}.npy", x)
                save_png(self.output_dir / f"{stem}.png", to_uint8(recon[i]), text=png_text(self._sha, None, index))
            save_json(self.output_dir / f"{stem}.json", sidecar(self._sha, None, index, details="metadata.json",
                                                                    config=self.config, **extra))
            self._count += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        total = int(trainer.strategy.reduce(torch.tensor(float(self._count)), reduce_op="sum"))
        if trainer.is_global_zero:
            normalization = getattr(trainer.datamodule, "normalization", None)
            units = {"intensity": normalization.describe()} if hasattr(normalization, "describe") else {}
            save_json(self.output_dir / "metadata.json",
                      run_metadata(trainer, pl_module, {**self.metadata, "checkpoint_sha256": self._sha,
                                                        "num_reconstructions": total, **units}, self.config))


class LatentWriter(BasePredictionWriter):
    """Writes the autoencoder's latents of each input and a latent manifest for the latent-diffusion stage.

    Layout under ``output_dir``::

        latents/NAME.npy     # float32 (latent_channels, *spatial / f), unscaled; sides padded to the patch
        masks/NAME.png       # 2D: the input's mask (at image resolution), when the data has masks
        masks/NAME.nii.gz    # 3D: the volume's label map on its grid (image resolution, the volume's affine)
        latents.json         # the latent manifest (format: medsynth.data.latent_manifest): records, the
                             # scaling to apply (z - shift) * scale, the autoencoder, the class names, the
                             # mask classes, and for volumes the intensity normalisation and geometry

    Latents encode real data: they are not marked synthetic. The scaling is computed over every latent written
    (all ranks): ``minmax`` maps the dataset's range onto [-1, 1], ``std`` standardises.

    Args:
        output_dir: destination folder.
        metadata: extra entries (the checkpoint path).
        scaling: ``minmax`` or ``std``.
    """

    def __init__(self, output_dir: str | os.PathLike, metadata: Optional[dict] = None, scaling: str = "minmax") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.metadata = dict(metadata or {})
        self.scaling = scaling

    def on_predict_start(self, trainer, pl_module) -> None:
        self._records: list[LatentRecord] = []
        self._stats = torch.tensor([float("inf"), float("-inf"), 0.0, 0.0, 0.0], dtype=torch.float64)  # min max n s ss
        ckpt = self.metadata.get("checkpoint")
        self._sha = file_sha256(ckpt) if ckpt and Path(ckpt).is_file() else None

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0):
        z_all = prediction["latent"]  # (B, C, *spatial)
        for i in range(z_all.shape[0]):
            z = z_all[i].double()
            stem = ReconstructionWriter._stem(str(prediction["name"][i]))
            save_npy(self.output_dir / "latents" / f"{stem}.npy", z_all[i].numpy().astype(np.float32))
            self._stats[0] = min(self._stats[0], z.min())
            self._stats[1] = max(self._stats[1], z.max())
            self._stats[2] += z.numel()
            self._stats[3] += z.sum()
            self._stats[4] += (z * z).sum()
            record: LatentRecord = {"latent": f"latents/{stem}.npy", "name": stem, "shape": list(z.shape),
                                    "image_shape": [int(v) for v in prediction["image_shape"][i]]}
            if "path" in prediction:
                record["source"] = str(prediction["path"][i])
            if "split" in prediction and prediction["split"][i]:
                record["split"] = str(prediction["split"][i])
            if "label" in prediction:
                record["label"] = int(prediction["label"][i])
            if "affine" in prediction:
                record["affine"] = prediction["affine"][i].double().tolist()
            if "norm_low" in prediction and "norm_high" in prediction:  # the intensities -1 and 1 stood for
                record["intensity_range"] = [float(prediction["norm_low"][i]), float(prediction["norm_high"][i])]
            if "mask" in prediction:
                affine = prediction["affine"][i].double().numpy() if "affine" in prediction else None
                record["mask"] = save_label_map(self.output_dir / "masks", stem, prediction["mask"][i].numpy(), affine,
                                                "medsynth label map (the encoded volume's)")
                if "mask_path" in prediction:
                    record["mask_source"] = str(prediction["mask_path"][i])
            self._records.append(record)

    def on_predict_end(self, trainer, pl_module) -> None:
        stats, records = self._stats, self._records
        if trainer.world_size > 1:  # every rank calls: gather statistics and records
            import torch.distributed as dist

            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, (stats, records))
            stats = torch.stack([g[0] for g in gathered])
            stats = torch.tensor([stats[:, 0].min(), stats[:, 1].max(), *stats[:, 2:].sum(0)], dtype=torch.float64)
            records = [r for g in gathered for r in g[1]]
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        normalization, geometry = getattr(data, "normalization", None), getattr(data, "geometry", None)
        # how volumes were read: generated ones are written back in these units and this geometry
        intensity = (normalization.describe([r["intensity_range"] for r in records if "intensity_range" in r])
                     if hasattr(normalization, "describe") else None)
        mask_classes = getattr(data, "num_classes", 0) if any("mask" in r for r in records) else 0
        save_json(self.output_dir / LATENT_MANIFEST, latent_manifest(
            records, latent_scaling(self.scaling, *(float(v) for v in stats)),
            {"checkpoint": self.metadata.get("checkpoint"), "sha256": self._sha, **pl_module.latent_description()},
            class_names=getattr(data, "class_names", None) if data is not None else None,
            intensity=intensity, geometry=geometry.describe() if hasattr(geometry, "describe") else None,
            num_classes=mask_classes))
