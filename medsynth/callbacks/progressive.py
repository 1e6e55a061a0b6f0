"""Progressive resolution: train at a low resolution, move up when validation stops improving (MedGen)."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from medsynth.errors import MedsynthError


class ProgressiveResolution(L.Callback):
    """Raise the data's ``image_size`` through ``sizes`` each time the monitored metric plateaus.

    A plateau is ``patience`` validations in a row without an improvement of at least ``min_delta`` (relative to
    the best value at the current size). The datamodule's ``image_size`` (and ``batch_size``, if ``batch_sizes``
    is given) changes, its datasets are rebuilt, and the loaders are re-created at the next epoch, so the Trainer
    needs ``reload_dataloaders_every_n_epochs: 1``. The current stage is saved in checkpoints: a resumed run
    continues at the resolution it had reached. Fully convolutional nets (the autoencoders) take any size that
    is a multiple of their downsampling factor.

    Args:
        sizes: image sides in increasing order, e.g. ``[64, 128, 256]``; the first should equal the data's
            ``image_size``.
        monitor: the validation metric to watch (lower is better).
        patience: validations without improvement that make a plateau.
        min_delta: relative improvement that counts (0.01 = 1 %).
        batch_sizes: optional batch size per stage (smaller at higher resolution); default: unchanged.
    """

    def __init__(self, sizes: list[int], monitor: str = "val/loss", patience: int = 3, min_delta: float = 0.01,
                 batch_sizes: Optional[list[int]] = None) -> None:
        if not sizes or list(sizes) != sorted(set(sizes)):
            raise MedsynthError(f"ProgressiveResolution sizes={sizes} must be distinct and increasing")
        if batch_sizes is not None and len(batch_sizes) != len(sizes):
            raise MedsynthError(f"ProgressiveResolution batch_sizes={batch_sizes} needs one entry per size {sizes}")
        self.sizes = list(sizes)
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.batch_sizes = list(batch_sizes) if batch_sizes else None
        self.stage = 0
        self.best = math.inf
        self.wait = 0

    def _apply(self, trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "image_size"):
            raise MedsynthError("ProgressiveResolution needs a datamodule with an image_size")
        dm.image_size = self.sizes[self.stage]
        if self.batch_sizes:
            dm.batch_size = self.batch_sizes[self.stage]
        dm.setup("fit")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not trainer.reload_dataloaders_every_n_epochs:
            raise MedsynthError("ProgressiveResolution needs --trainer.reload_dataloaders_every_n_epochs 1")

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if getattr(dm, "image_size", None) != self.sizes[self.stage]:
            self._apply(trainer)  # a resumed run continues at the size it had reached

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if value < self.best * (1 - self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience and self.stage + 1 < len(self.sizes):
            self.stage += 1
            self.best, self.wait = math.inf, 0
            rank_zero_info(f"ProgressiveResolution: {self.monitor} plateaued; training at {self.sizes[self.stage]} "
                           f"from step {trainer.global_step}")
            self._apply(trainer)
            for logger in trainer.loggers:
                logger.log_metrics({"progressive/size": float(self.sizes[self.stage])}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "best": self.best, "wait": self.wait, "sizes": self.sizes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sizes") != self.sizes:
            raise MedsynthError(f"the checkpoint was trained with ProgressiveResolution sizes={state_dict.get('sizes')}, "
                                f"not {self.sizes}")
        self.stage, self.best, self.wait = state_dict["stage"], state_dict["best"], state_dict["wait"]
