"""Reading back a ``medsynth predict`` output folder, to score the samples against what they were conditioned on:
their masks (mask faithfulness, judged by a segmenter) or their classes (class faithfulness, judged by a
classifier; 2D ``.npy`` images or 3D NIfTI volumes)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import Dataset

from medsynth.data.base import MedsynthDataModule
from medsynth.data.datamodules import check_intensity_range
from medsynth.data.image2d import read_mask, resize_image, resize_mask
from medsynth.data.volumes import NIFTI_SUFFIXES, Normalization, read_volume
from medsynth.errors import DataError
from medsynth.io import check_complete, read_json, read_nifti, read_npy, save_json


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(v)) for v in shape)


class _SamplePairs(Dataset):
    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, image_size: int) -> None:
        self.pairs, self.num_classes, self.image_size = pairs, num_classes, image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        sample, mask = self.pairs[index]
        x = resize_image(torch.from_numpy(read_sample(sample)), self.image_size)
        m = resize_mask(torch.from_numpy(read_mask(mask, self.num_classes)), self.image_size)
        return {"image": x, "mask": m, "name": sample.name, "index": index}


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _sample_shape(path: Path) -> tuple[int, ...]:
    """The shape of a sample: ``(C, H, W)`` of an ``.npy`` (read from its header only) or ``(C, X, Y, Z)`` of a
    NIfTI volume (one channel for a 3D file, the last axis of a 4D file)."""
    if not _is_volume(path):
        return tuple(read_npy(path, "sample", mmap=True).shape)
    data, _ = read_nifti(path, "sample volume")
    if data.ndim == 3:
        return (1, *data.shape)
    if data.ndim == 4:
        return (data.shape[3], *data.shape[:3])
    raise DataError(f"{path}: sample volume of {data.ndim} axes {data.shape}; expected a 3D (or 4D, channels last) volume")


def sample_files(folder: Path) -> list[Path]:
    """The samples in one folder of a ``medsynth predict`` output, sorted: ``.npy`` images (2D) or NIfTI volumes
    (3D); sidecars, previews and hidden files left out.

    Raises:
        DataError: the folder holds both kinds (naming the folder).
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and (p.suffix.lower() == ".npy" or _is_volume(p)))
    if len({_is_volume(p) for p in files}) > 1:
        raise DataError(f"{folder}: holds both .npy images and NIfTI volumes; one kind of sample per folder")
    return files


def read_sample(path: Path) -> np.ndarray:
    """A sample ``.npy`` as float32 ``(C, H, W)``, checked finite."""
    x = read_npy(path, "sample")
    if x.dtype.kind not in "biuf" or not np.isfinite(x).all():
        raise DataError(f"{path}: sample holds non-numeric, NaN or infinite values")
    return x.astype(np.float32)


class _LabelledSamples(Dataset):
    """Class-conditional samples: items ``image`` (2D: ``(C, S, S)``, resized; 3D: ``(C, X, Y, Z)`` as stored),
    ``label`` (their class), ``name``, ``index``.

    Args:
        items: sample files and their labels.
        image_size: side 2D samples are resized to.
        channels: image channels.
        normalization: how 3D volumes are scaled to [-1, 1] (the judge's training scaling); 2D samples are
            stored in [-1, 1] already.
    """

    def __init__(self, items: list[tuple[Path, int]], image_size: int, channels: int,
                 normalization: Normalization) -> None:
        self.items, self.image_size, self.channels, self.normalization = items, image_size, channels, normalization

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        sample, label = self.items[index]
        if _is_volume(sample):  # written in the sources' units: scaled as the judge's real volumes were
            x, _ = self.normalization.to_unit(read_volume(sample, self.channels)[0])
        else:
            x = resize_image(torch.from_numpy(read_sample(sample)), self.image_size)
        return {"image": x, "label": label, "name": f"{sample.parent.name}/{sample.name}", "index": index}


class SampleDirDataModule(MedsynthDataModule):
    """The samples of a ``medsynth predict`` folder with what they were conditioned on (``test`` only).

    Two kinds of folder, told apart by ``metadata.json``:

    * mask-guided samples (``samples/NAME.npy`` with ``masks/NAME.png``): batches hold ``image`` and ``mask``;
      ``medsynth test --config configs/segmenter2d.yaml --ckpt_path SEG.ckpt --data medsynth.data.SampleDirDataModule
      --data.samples_dir DIR`` reports the segmenter's Dice on them (mask faithfulness);
    * class-conditional samples (``metadata.json`` names ``class_names``; samples in ``<class_name>/*.npy``, or
      3D volumes ``<class_name>/*.nii.gz`` as ``configs/biflownet3d.yaml`` generates them): batches hold ``image``
      and ``label``; the same command with ``configs/classifier2d.yaml`` (3D: plus
      ``configs/experiments/classifier3d.yaml``) and a classifier checkpoint reports its accuracy on them (class
      faithfulness). Classes without a folder are not scored. Volumes are judged whole, scaled to [-1, 1] as the
      judge's real training volumes were (``normalization``, ``percentiles``, ``ct_window``: taken from a 3D
      judge's checkpoint); every volume must have the first one's shape and channels.

    Args:
        samples_dir: a ``medsynth predict`` output folder (``metadata.json`` and the samples).
        image_size: side 2D samples (and masks) are resized to (the judge's training size; default: as stored).
            Volumes are judged as stored.
        batch_size: samples per batch.
        overwrite: replace an existing ``scores.json`` (and report) in ``samples_dir``.
        features: local TorchScript feature network for FID/KID (e.g. Inception-v3 exported once; see
            :mod:`medsynth.metrics.distribution`); never downloaded. Without it FID/KID are not computed.
        real_dir: real images that FID/KID compare the samples with: a folder of ``.png``/``.npy`` images, or one
            holding ``train``/``val``/``test`` subfolders (e.g. ``IMGS``); needed with ``features``.
        intensity_range: stored ``(low, high)`` of the real images mapped to [-1, 1], as in training (taken from
            the judge's checkpoint; default: by dtype).
        normalization: how 3D sample volumes are scaled to [-1, 1]: ``mri`` (per-volume percentile clip) or ``ct``
            (fixed HU window), as :class:`~medsynth.data.VolumeDataModule` scaled the judge's training volumes
            (taken from the judge's checkpoint; default ``mri``).
        percentiles: lower and upper percentiles (0..100) of the nonzero voxels, for ``mri`` (the judge's).
        ct_window: lower and upper intensities in HU, for ``ct`` (the judge's).

    The scores (``test/dice`` or ``test/accuracy``, and per class) are written to ``samples_dir/scores.json`` with
    the judge's checkpoint path; with the :class:`~medsynth.callbacks.SampleReport` callback (in the judge
    configs) also diversity, FID/KID, the real-image ceiling, ``report.md`` and bar charts.
    """

    model_describing_args = ("image_size", "intensity_range", "normalization", "percentiles", "ct_window")
    data_location_args = ()

    def __init__(
        self,
        samples_dir: Optional[Path] = None,
        image_size: Optional[PositiveInt] = None,
        batch_size: PositiveInt = 16,
        overwrite: bool = False,
        features: Optional[Path] = None,
        real_dir: Optional[Path] = None,
        intensity_range: Optional[tuple[float, float]] = None,
        normalization: Optional[Literal["mri", "ct"]] = None,
        percentiles: Optional[tuple[float, float]] = None,
        ct_window: Optional[tuple[float, float]] = None,
    ) -> None:
        super().__init__()
        # None: the judge's (filled from its checkpoint by the CLI), else VolumeDataModule's defaults
        self.normalization = Normalization(normalization or "mri", tuple(percentiles or (0.5, 99.5)),
                                           tuple(ct_window or (-1000.0, 1000.0)))
        if samples_dir is None:
            raise DataError("data.samples_dir is not set: give a `medsynth predict` output folder")
        self.features = Path(features) if features is not None else None
        self.real_dir = Path(real_dir) if real_dir is not None else None
        check_intensity_range(intensity_range)
        self.intensity_range = intensity_range
        if self.features is not None and not self.features.is_file():
            raise DataError(f"{self.features}: FID/KID feature network does not exist (it is never downloaded; "
                            "see medsynth/metrics/distribution.py for exporting one)")
        if self.features is not None and self.real_dir is None:
            raise DataError(f"data.features={self.features}: FID/KID also need real images: --data.real_dir IMGS")
        if self.real_dir is not None and not self.real_dir.is_dir():
            raise DataError(f"{self.real_dir}: real image folder (data.real_dir) does not exist")
        self.save_hyperparameters(logger=False)  # logged under "data" by the CLI (cli.LogDataSettings)
        self.samples_dir = Path(samples_dir)
        meta_path = self.samples_dir / "metadata.json"
        if not self.samples_dir.is_dir():
            raise DataError(f"{self.samples_dir}: sample folder (data.samples_dir) does not exist")
        check_complete(self.samples_dir)
        if not meta_path.is_file():
            raise DataError(f"{self.samples_dir}: no metadata.json; not a `medsynth predict` output folder")
        meta = read_json(meta_path, "metadata")
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: metadata is not a JSON object")
        data = ((meta.get("config") or {}).get("data") or {}).get("init_args") or {}
        model = ((meta.get("config") or {}).get("model") or {}).get("init_args") or {}
        self.num_classes = int(data.get("num_classes") or model.get("num_classes") or 0)
        self.class_names: Optional[list[str]] = None
        self.class_folders: list[tuple[Path, int]] = []
        if self.num_classes < 2 or not (self.samples_dir / "masks").is_dir():
            names = meta.get("class_names") or model.get("class_names")
            if not names:
                raise DataError(f"{meta_path}: these samples have no conditioning masks or class names; "
                                "nothing to score against")
            self.num_classes, self.class_names = 0, [str(n) for n in names]
            self.class_folders = self._class_folders(meta_path)
        # what the samples are: read from the first one, since a latent model's config describes its latents
        self.volume_shape: Optional[tuple[int, ...]] = None  # (C, X, Y, Z) of 3D samples
        stored = self._first_sample_shape()
        self.channels = int(stored[0] if stored else data.get("channels") or model.get("image_channels") or 1)
        size = image_size or (stored[-1] if stored else None) or data.get("image_size") or model.get("image_size")
        if not size:
            raise DataError(f"{meta_path}: no image size recorded; pass --data.image_size")
        self.image_size = int(size)
        self.batch_size = batch_size
        self.scores_path = self.samples_dir / "scores.json"
        for done in (self.scores_path, self.samples_dir / "report.md"):
            if done.exists() and not overwrite:
                raise DataError(f"{done}: already exists; pass --data.overwrite true to score again")
        self._scores_stamp = self._stamp()
        self.num_workers = 0  # samples are small .npy files, read in this process

    def _first_sample_shape(self) -> Optional[tuple[int, ...]]:
        """The ``(C, H, W)`` (or ``(C, X, Y, Z)``) of the folder's first sample, or ``None`` when it has none
        (reported at setup)."""
        folders = [f for f, _ in self.class_folders] if self.class_names is not None else [self.samples_dir / "samples"]
        first = next((f for folder in folders if folder.is_dir() for f in sample_files(folder)), None)
        if first is None:
            return None
        shape = _sample_shape(first)
        if _is_volume(first):
            if self.class_names is None:
                raise DataError(f"{first}: mask-guided volumes are scored by scripts/seg3d_dice.py, not `medsynth test`")
            self.volume_shape = shape
        elif len(shape) != 3:
            raise DataError(f"{first}: sample of shape {shape}; expected (C, H, W) images")
        return shape

    def _class_folders(self, meta_path: Path) -> list[tuple[Path, int]]:
        """The sample folders of the classes, with their labels; every sub-folder must be one of ``class_names``."""
        folders = []
        for folder in sorted(p for p in self.samples_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name not in self.class_names:
                raise DataError(f"{folder}: not a class of these samples (class_names in {meta_path}: "
                                f"{self.class_names})")
            folders.append((folder, self.class_names.index(folder.name)))
        if not folders:
            raise DataError(f"{self.samples_dir}: no class folders (expected {self.samples_dir}/<class_name>/*.npy "
                            "or *.nii.gz)")
        return folders

    def model_args(self) -> dict:
        """What the judge must agree with (linked into the model's arguments by the CLI)."""
        args = {"num_classes": self.num_classes, "image_channels": self.channels, "image_size": self.image_size}
        if self.class_names is not None:
            args["class_names"] = self.class_names
        return args

    def dataset(self, split: str) -> Dataset:
        if split != "test":
            raise DataError("SampleDirDataModule only serves `medsynth test` (scoring)")
        return self._labelled() if self.class_names is not None else self._pairs()

    def _pairs(self) -> Dataset:
        pairs = []
        for sample in sorted((self.samples_dir / "samples").glob("*.npy")):
            mask = self.samples_dir / "masks" / f"{sample.stem}.png"
            if not mask.is_file():
                raise DataError(f"{sample}: no conditioning mask {mask}")
            shape = _sample_shape(sample)
            m = read_mask(mask, self.num_classes)
            if tuple(shape[-2:]) != tuple(m.shape):
                raise DataError(f"{mask}: mask size {m.shape[1]}x{m.shape[0]} differs from its sample {sample} "
                                f"({shape[-1]}x{shape[-2]})")
            pairs.append((sample, mask))
        if not pairs:
            raise DataError(f"{self.samples_dir / 'samples'}: no samples (*.npy)")
        return _SamplePairs(pairs, self.num_classes, self.image_size)

    def _labelled(self) -> Dataset:
        items = []
        for folder, label in self.class_folders:
            files = sample_files(folder)
            if not files:
                raise DataError(f"{folder}: no samples (*.npy or *.nii.gz) of class '{folder.name}'")
            for f in files:
                if self.volume_shape is None:
                    shape = _sample_shape(f) if not _is_volume(f) else None
                    if shape is None or len(shape) != 3 or shape[0] != self.channels:
                        what = "a volume" if shape is None else f"of shape {shape}"
                        raise DataError(f"{f}: sample {what}; expected ({self.channels}, H, W) images as the others")
                else:  # read whole now (volumes are batched together): a bad file fails here, named
                    shape = tuple(read_volume(f, self.channels)[0].shape) if _is_volume(f) else None
                    if shape != self.volume_shape:
                        what = "an .npy image" if shape is None else f"of shape {_shape(shape)}"
                        raise DataError(f"{f}: sample volume {what}; expected {_shape(self.volume_shape)} "
                                        "(channels, X, Y, Z) as the first sample")
                items.append((f, label))
        return _LabelledSamples(items, self.image_size, self.channels, self.normalization)

    def _stamp(self) -> Optional[tuple[int, int]]:
        st = self.scores_path.stat() if self.scores_path.is_file() else None
        return (st.st_mtime_ns, st.st_size) if st else None

    def teardown(self, stage: str) -> None:
        trainer = getattr(self, "trainer", None)
        if stage != "test" or trainer is None or not trainer.is_global_zero:
            return
        if self._stamp() != self._scores_stamp:  # written during this run (a report callback's richer scores)
            return
        scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        judge = str(trainer.ckpt_path) if trainer.ckpt_path else None
        result = {"samples_dir": str(self.samples_dir), "judge": judge, "num_samples": len(self.datasets.get("test", [])),
                  "scores": scores}
        if self.class_names is None:
            result["segmenter"] = judge  # the key earlier versions wrote for mask faithfulness
        save_json(self.scores_path, result)
