"""Two-stage generation (MedGen): masks as the thing generated, then masks generated on the fly as conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
from torch.utils.data import Dataset, TensorDataset

from medsynth.data.base import MedsynthDataModule
from medsynth.data.datamodules import SegGuidedImageDataModule
from medsynth.data.image2d import IndexDataset
from medsynth.errors import MedsynthError
from medsynth.loading import load_module


class _MasksAsImages(Dataset):
    """Wraps a mask dataset: each item's ``image`` becomes its one-hot mask scaled to [-1, 1]; no condition."""

    def __init__(self, base: Dataset, num_classes: int) -> None:
        self.base, self.num_classes = base, num_classes
        self.records = base.records

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        mask = item.pop("mask")
        item.pop("image", None)
        item["image"] = F.one_hot(mask, self.num_classes).movedim(-1, 0).float() * 2 - 1  # (K, S, S)
        return item


class MaskDataModule(SegGuidedImageDataModule):
    """Segmentation masks as the training target of an unconditional mask generator (stage 1 of two).

    Reads the same layouts as :class:`SegGuidedImageDataModule` (only the masks are used; images may be absent)
    and gives each mask as ``num_classes`` one-hot channels in [-1, 1]. The model it feeds is unconditional, has
    ``num_classes`` channels and decodes its samples by argmax (``predict`` writes ``masks/NAME.png``).
    """

    def model_args(self) -> dict:
        return {"num_classes": 0, "image_channels": self.num_classes, "image_size": self.image_size,
                "class_names": None, "output": "mask"}

    def dataset(self, split: str) -> Dataset:
        if self.num_classes < 2:
            raise MedsynthError(f"data.num_classes={self.num_classes}: a mask generator needs >= 2 classes")
        if split == "predict":
            return IndexDataset(self.num_samples)
        base = self._dataset(split, need_images=False, random_flip=self.random_flip and split == "train")
        return _MasksAsImages(base, self.num_classes)


class GeneratedMaskDataModule(MedsynthDataModule):
    """Masks sampled from a trained mask generator, as the conditions of a mask-guided image model (stage 2).

    ``medsynth predict`` with an image model's checkpoint and this data writes image/mask pairs: every sample
    beside the generated mask it was conditioned on.

    Args:
        mask_checkpoint: checkpoint of a mask generator trained with :class:`MaskDataModule`.
        num_samples: image/mask pairs to generate.
        image_channels: channels of the image model (1 grey, 3 RGB, ...).
        batch_size: masks generated, then images sampled, per batch.
        seed: seed of the mask generator's noise (the image model has its own, ``--seed``).
        device: where the masks are generated: ``auto`` uses the first GPU if there is one.
    """

    def __init__(
        self,
        mask_checkpoint: Optional[Path] = None,
        num_samples: PositiveInt = 16,
        image_channels: PositiveInt = 1,
        batch_size: PositiveInt = 8,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        super().__init__()
        if mask_checkpoint is None:
            raise MedsynthError("data.mask_checkpoint is not set: give the mask generator's checkpoint")
        self.save_hyperparameters(logger=False)  # logged under "data" by the CLI (cli.LogDataSettings)
        self.mask_checkpoint = Path(mask_checkpoint)
        self.mask_model = load_module(self.mask_checkpoint)
        if getattr(self.mask_model, "output", "image") != "mask":
            raise MedsynthError(f"{self.mask_checkpoint}: not a mask generator (train one with MaskDataModule)")
        self.num_classes = self.mask_model.image_channels
        self.image_size = self.mask_model.image_size
        self.num_samples, self.image_channels, self.batch_size = num_samples, image_channels, batch_size
        self.seed, self.device = seed, device
        self.num_workers = 0  # the masks are generated in this process, once

    def model_args(self) -> dict:
        return {"num_classes": self.num_classes, "image_channels": self.image_channels,
                "image_size": self.image_size, "class_names": None, "output": "image"}

    @torch.no_grad()
    def dataset(self, split: str) -> Dataset:
        if split != "predict":
            raise MedsynthError("GeneratedMaskDataModule only serves `medsynth predict`")
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        model = self.mask_model.to(device)
        masks = []
        for start in range(0, self.num_samples, self.batch_size):
            indices = list(range(start, min(start + self.batch_size, self.num_samples)))
            masks.append(model.sample(indices=indices, seed=self.seed).argmax(1).cpu())
        self.mask_model.cpu()
        return _GeneratedMasks(torch.cat(masks))


class _GeneratedMasks(TensorDataset):
    def __getitem__(self, index: int) -> dict:
        return {"mask": self.tensors[0][index], "index": index, "name": f"pair_{index:05d}.png", "synthetic_mask": True}
