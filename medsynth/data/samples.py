"""Reading back a ``medsynth predict`` output folder, to score the samples against what they were conditioned on:
their masks (mask faithfulness, judged by a segmenter) or their classes (class faithfulness, judged by a
classifier)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import Dataset

from medsynth.data.base import MedsynthDataModule
from medsynth.data.datamodules import check_intensity_range
from medsynth.data.image2d import read_mask, resize_image, resize_mask
from medsynth.errors import DataError
from medsynth.io import check_complete, read_json, read_npy, save_json


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


def _sample_shape(path: Path) -> tuple[int, ...]:
    """The stored shape of a sample ``.npy`` (read from its header only)."""
    return tuple(read_npy(path, "sample", mmap=True).shape)


def read_sample(path: Path) -> np.ndarray:
    """A sample ``.npy`` as float32 ``(C, H, W)``, checked finite."""
    x = read_npy(path, "sample")
    if x.dtype.kind not in "biuf" or not np.isfinite(x).all():
        raise DataError(f"{path}: sample holds non-numeric, NaN or infinite values")
    return x.astype(np.float32)


class _LabelledSamples(Dataset):
    """Class-conditional samples: items ``image`` ``(C, S, S)``, ``label`` (their class), ``name``, ``index``."""

    def __init__(self, items: list[tuple[Path, int]], image_size: int) -> None:
        self.items, self.image_size = items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        sample, label = self.items[index]
        x = resize_image(torch.from_numpy(read_sample(sample)), self.image_size)
        return {"image": x, "label": label, "name": f"{sample.parent.name}/{sample.name}", "index": index}


class SampleDirDataModule(MedsynthDataModule):
    """The samples of a ``medsynth predict`` folder with what they were conditioned on (``test`` only).

    Two kinds of folder, told apart by ``metadata.json``:

    * mask-guided samples (``samples/NAME.npy`` with ``masks/NAME.png``): batches hold ``image`` and ``mask``;
      ``medsynth test --config configs/segmenter2d.yaml --ckpt_path SEG.ckpt --data medsynth.data.SampleDirDataModule
      --data.samples_dir DIR`` reports the segmenter's Dice on them (mask faithfulness);
    * class-conditional samples (``metadata.json`` names ``class_names``; samples in ``<class_name>/*.npy``):
      batches hold ``image`` and ``label``; the same command with ``configs/classifier2d.yaml`` and a classifier
      checkpoint reports its accuracy on them (class faithfulness). Classes without a folder are not scored.

    Args:
        samples_dir: a ``medsynth predict`` output folder (``metadata.json`` and the samples).
        image_size: side the samples (and masks) are resized to (the judge's training size; default: as stored).
        batch_size: samples per batch.
        overwrite: replace an existing ``scores.json`` (and report) in ``samples_dir``.
        features: local TorchScript feature network for FID/KID (e.g. Inception-v3 exported once; see
            :mod:`medsynth.metrics.distribution`); never downloaded. Without it FID/KID are not computed.
        real_dir: real images that FID/KID compare the samples with: a folder of ``.png``/``.npy`` images, or one
            holding ``train``/``val``/``test`` subfolders (e.g. ``IMGS``); needed with ``features``.
        intensity_range: stored ``(low, high)`` of the real images mapped to [-1, 1], as in training (taken from
            the judge's checkpoint; default: by dtype).

    The scores (``test/dice`` or ``test/accuracy``, and per class) are written to ``samples_dir/scores.json`` with
    the judge's checkpoint path; with the :class:`~medsynth.callbacks.SampleReport` callback (in the judge
    configs) also diversity, FID/KID, the real-image ceiling, ``report.md`` and bar charts.
    """

    model_describing_args = ("image_size", "intensity_range")
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
    ) -> None:
        super().__init__()
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
        """The ``(C, H, W)`` of the folder's first sample, or ``None`` when it has none (reported at setup)."""
        folders = [f for f, _ in self.class_folders] if self.class_names is not None else [self.samples_dir / "samples"]
        first = next((f for folder in folders for f in sorted(folder.glob("*.npy"))), None)
        if first is None:
            return None
        shape = _sample_shape(first)
        if len(shape) != 3:
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
            raise DataError(f"{self.samples_dir}: no class folders (expected {self.samples_dir}/<class_name>/*.npy)")
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
            files = sorted(folder.glob("*.npy"))
            if not files:
                raise DataError(f"{folder}: no samples (*.npy) of class '{folder.name}'")
            for f in files:
                shape = _sample_shape(f)
                if len(shape) != 3 or shape[0] != self.channels:
                    raise DataError(f"{f}: sample of shape {shape}; expected ({self.channels}, H, W)")
                items.append((f, label))
        return _LabelledSamples(items, self.image_size)

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
