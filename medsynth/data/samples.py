"""Reading back a ``medsynth predict`` output folder, to score the samples against their conditioning masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medsynth.data.image2d import read_mask, resize_image, resize_mask
from medsynth.errors import DataError
from medsynth.io import save_json


class _SamplePairs(Dataset):
    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, image_size: int) -> None:
        self.pairs, self.num_classes, self.image_size = pairs, num_classes, image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        sample, mask = self.pairs[index]
        x = resize_image(torch.from_numpy(np.load(sample).astype(np.float32)), self.image_size)
        m = resize_mask(torch.from_numpy(read_mask(mask, self.num_classes)), self.image_size)
        return {"image": x, "mask": m, "name": sample.name, "index": index}


class SampleDirDataModule(L.LightningDataModule):
    """The samples of a ``medsynth predict`` folder paired with the masks they were conditioned on (``test``).

    ``medsynth test --config configs/segmenter2d.yaml --ckpt_path SEG.ckpt --data medsynth.data.SampleDirDataModule
    --data.samples_dir DIR`` reports the segmenter's Dice on the samples: mask faithfulness.

    Args:
        samples_dir: a ``medsynth predict`` output folder (``metadata.json``, ``samples/*.npy``, ``masks/*.png``).
        image_size: side the samples and masks are resized to (the segmenter's training size; default: as stored).
        batch_size: samples per batch.
        overwrite: replace an existing ``scores.json`` in ``samples_dir``.

    The scores (``test/dice`` and per class) are written to ``samples_dir/scores.json`` with the segmenter's path.
    """

    def __init__(
        self,
        samples_dir: Optional[Path] = None,
        image_size: Optional[int] = None,
        batch_size: int = 16,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if samples_dir is None:
            raise DataError("data.samples_dir is not set: give a `medsynth predict` output folder")
        self.save_hyperparameters()
        self.samples_dir = Path(samples_dir)
        meta_path = self.samples_dir / "metadata.json"
        if not meta_path.is_file():
            raise DataError(f"{self.samples_dir}: no metadata.json; not a `medsynth predict` output folder")
        meta = json.loads(meta_path.read_text())
        data = ((meta.get("config") or {}).get("data") or {}).get("init_args") or {}
        model = ((meta.get("config") or {}).get("model") or {}).get("init_args") or {}
        self.num_classes = int(data.get("num_classes") or model.get("num_classes") or 0)
        if self.num_classes < 2 or not (self.samples_dir / "masks").is_dir():
            raise DataError(f"{meta_path}: these samples have no conditioning masks; nothing to score against")
        self.channels = int(data.get("channels") or model.get("image_channels") or 1)
        self.image_size = int(image_size or data.get("image_size") or model.get("image_size"))
        self.batch_size = batch_size
        self.scores_path = self.samples_dir / "scores.json"
        if self.scores_path.exists() and not overwrite:
            raise DataError(f"{self.scores_path}: already exists; pass --data.overwrite true to score again")
        self.dataset: Optional[Dataset] = None

    def model_args(self) -> dict:
        return {"num_classes": self.num_classes, "image_channels": self.channels, "image_size": self.image_size}

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise DataError("SampleDirDataModule only serves `medsynth test` (scoring)")
        pairs = []
        for sample in sorted((self.samples_dir / "samples").glob("*.npy")):
            mask = self.samples_dir / "masks" / f"{sample.stem}.png"
            if not mask.is_file():
                raise DataError(f"{sample}: no conditioning mask {mask}")
            shape = np.load(sample, mmap_mode="r").shape
            m = read_mask(mask, self.num_classes)
            if tuple(shape[-2:]) != tuple(m.shape):
                raise DataError(f"{mask}: mask size {m.shape[1]}x{m.shape[0]} differs from its sample {sample} "
                                f"({shape[-1]}x{shape[-2]})")
            pairs.append((sample, mask))
        if not pairs:
            raise DataError(f"{self.samples_dir / 'samples'}: no samples (*.npy)")
        self.dataset = _SamplePairs(pairs, self.num_classes, self.image_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)

    def teardown(self, stage: str) -> None:
        trainer = getattr(self, "trainer", None)
        if stage != "test" or trainer is None or not trainer.is_global_zero:
            return
        scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        save_json(self.scores_path, {"samples_dir": str(self.samples_dir), "segmenter": str(trainer.ckpt_path),
                                     "num_samples": len(self.dataset or []), "scores": scores})
