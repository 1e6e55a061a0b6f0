"""SegmenterModule: a segmentation net trained on real images, the judge of mask faithfulness."""

from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from torch import Tensor, nn

from medsynth.errors import MedsynthError
from medsynth.modules.optim import plain_callable
from medsynth.nets.segmenter import SegUNet


class SegmenterModule(L.LightningModule):
    """Trains a segmenter on real image/mask pairs (Dice + cross-entropy), validated by per-class Dice.

    The segmentation-guided diffusion reference judges generated images by the Dice between such a segmenter's
    prediction on them and the masks they were conditioned on; its Dice on real test images is the ceiling.

    Args:
        net: segmentation net built with ``(image_channels, num_classes)``; default :class:`~medsynth.nets.SegUNet`.
        num_classes: classes counting background (linked from the data).
        image_channels: image channels (linked from the data).
        lr: learning rate.
        optimizer: optimiser class; its learning rate is ``lr``.
    """

    def __init__(
        self,
        net: Optional[Callable[[int, int], nn.Module]] = None,
        num_classes: int = 2,
        image_channels: int = 1,
        lr: float = 1e-3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise MedsynthError(f"model.num_classes={num_classes}: a segmenter needs masks with >= 2 classes")
        self.save_hyperparameters()
        self.num_classes, self.image_channels, self.lr = num_classes, image_channels, lr
        self.optimizer = plain_callable(optimizer)
        self.net = (net or SegUNet)(image_channels, num_classes)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K, *spatial)``."""
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(self(batch["image"]), batch["mask"].unsqueeze(1))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def per_class_dice(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Dice ``(B, K-1)`` per sample and foreground class (NaN where a class is absent from both)."""
        k = self.num_classes
        pred = torch.nn.functional.one_hot(logits.argmax(1), k).movedim(-1, 1)
        ref = torch.nn.functional.one_hot(mask.long(), k).movedim(-1, 1)
        return DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, ref)

    def _evaluate(self, batch: dict, stage: str) -> Tensor:
        logits = self(batch["image"])
        n = batch["image"].shape[0]
        self.log(f"{stage}/loss", self.loss(logits, batch["mask"].unsqueeze(1)), sync_dist=True, batch_size=n)
        dice = self.per_class_dice(logits, batch["mask"])
        per_class = torch.nanmean(dice, dim=0)
        for c, value in enumerate(per_class.tolist(), start=1):
            if value == value:  # not NaN
                self.log(f"{stage}/dice_class{c}", value, sync_dist=True, batch_size=n)
        mean = torch.nanmean(dice)
        self.log(f"{stage}/dice", torch.nan_to_num(mean), prog_bar=True, sync_dist=True, batch_size=n)
        return mean

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    @torch.no_grad()
    def segment(self, x: Tensor, window: Optional[int] = None) -> Tensor:
        """Class indices ``(B, *spatial)`` of whole images or volumes ``(B, C, *spatial)`` in [-1, 1]: in one pass,
        or with ``window`` by MONAI's sliding windows of that side (overlap 0.25, Gaussian blending), for volumes
        larger than the patches the net was trained on."""
        if window is None:
            return self(x).argmax(1)
        from monai.inferers import sliding_window_inference

        size = (int(window),) * (x.ndim - 2)
        return sliding_window_inference(x, size, 2, self, overlap=0.25, mode="gaussian").argmax(1)

    def configure_optimizers(self):
        return self.optimizer(self.net.parameters(), lr=self.lr)
