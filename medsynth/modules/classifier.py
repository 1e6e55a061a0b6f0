"""ClassifierModule: an image classifier trained on real images, the judge of class faithfulness."""

from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F

from medsynth.errors import MedsynthError
from medsynth.modules.optim import plain_callable
from medsynth.nets.classifier import SmallClassifier


class ClassifierModule(L.LightningModule):
    """Trains a classifier on real class-labelled images (cross-entropy), validated by accuracy.

    Class-conditional samples are judged by how often such a classifier assigns them the class they were generated
    for (class faithfulness); its accuracy on real images is the ceiling. ``medsynth test`` on a folder of samples
    (:class:`~medsynth.data.SampleDirDataModule`) reports ``test/accuracy`` and ``test/accuracy_<class_name>``.

    Args:
        net: classifier built with ``(image_channels, num_classes)``, mapping images ``(B, C, *spatial)`` to logits
            ``(B, num_classes)``; default :class:`~medsynth.nets.SmallClassifier`.
        class_names: class names in label order (linked from the data).
        image_channels: image channels (linked from the data).
        image_size: side of the images trained on, in pixels (linked from the data; recorded, not used by the net).
        lr: learning rate.
        optimizer: optimiser class; its learning rate is ``lr``.
    """

    def __init__(
        self,
        net: Optional[Callable[[int, int], nn.Module]] = None,
        class_names: Optional[list[str]] = None,
        image_channels: int = 1,
        image_size: int = 64,
        lr: float = 1e-3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        if not class_names or len(class_names) < 2:
            raise MedsynthError(f"model.class_names={class_names!r}: a classifier needs class-labelled data with >= 2 "
                                "classes (e.g. medsynth.data.ClassImageDataModule, or a folder of class-conditional "
                                "samples)")
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.image_channels, self.image_size, self.lr = image_channels, image_size, lr
        self.optimizer = plain_callable(optimizer)
        self.net = (net or SmallClassifier)(image_channels, len(self.class_names))
        self._counts: Optional[Tensor] = None  # (2, K): correct and total per class over an evaluation epoch

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)`` for images ``(B, C, *spatial)`` in [-1, 1]."""
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["label"].long())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _start_counting(self) -> None:
        self._counts = torch.zeros(2, len(self.class_names), device=self.device)

    def _evaluate(self, batch: dict, stage: str) -> Tensor:
        logits, label = self(batch["image"]), batch["label"].long()  # (B, K), (B,)
        n, k = label.shape[0], len(self.class_names)
        if bool(((label < 0) | (label >= k)).any()):
            raise MedsynthError(f"label {int(label.max())} is outside the classifier's {k} classes {self.class_names}")
        correct = logits.argmax(1) == label
        self.log(f"{stage}/loss", F.cross_entropy(logits, label), sync_dist=True, batch_size=n)
        accuracy = correct.float().mean()
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True, sync_dist=True, batch_size=n)
        if self._counts is None:
            self._start_counting()
        self._counts[0] += torch.bincount(label[correct], minlength=k).to(self._counts)
        self._counts[1] += torch.bincount(label, minlength=k).to(self._counts)
        return accuracy

    def _log_per_class(self, stage: str) -> None:
        """Per-class accuracy over the whole epoch (all ranks), for the classes that occurred."""
        if self._counts is None:
            return
        correct, total = self.trainer.strategy.reduce(self._counts, reduce_op="sum")
        for name, c, t in zip(self.class_names, correct.tolist(), total.tolist()):
            if t > 0:  # the same on every rank after the reduction, so every rank logs the same keys
                self.log(f"{stage}/accuracy_{name}", c / t, sync_dist=True)
        self._counts = None

    def on_validation_epoch_start(self) -> None:
        self._start_counting()

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val")

    def on_test_epoch_start(self) -> None:
        self._start_counting()

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test")

    def configure_optimizers(self):
        return self.optimizer(self.net.parameters(), lr=self.lr)
