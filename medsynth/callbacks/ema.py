"""Exponential moving average of the weights whose decay warms up, on Lightning's ``EMAWeightAveraging``."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor

from medsynth.errors import MedsynthError


class WarmupEMADecay:
    """The EMA update ``ema <- d_n * ema + (1 - d_n) * current`` with a decay that ramps up with the update count.

    ``d_n = min(decay, (1 + n) / (10 + n))`` after ``n`` averaged updates (the rule of diffusers'
    ``EMAModel(use_ema_warmup=False)`` default; Tarvainen & Valpola, 2017, "Mean teachers"): the average follows
    the fast-changing early weights closely and reaches ``decay`` after ``(10 decay - 1) / (1 - decay)`` updates
    (999 updates at 0.9, about 9,000 at 0.999). A fixed decay of 0.999 still holds 0.999^1500 = 22 % of the random
    initialisation after 1,500 steps; with the ramp that share is below 1e-3 after 100 steps.

    A plain class rather than a closure so the callback can be deep-copied and pickled.

    Args:
        decay: the target decay in [0, 1).
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    def current(self, num_averaged: int) -> float:
        """The decay of the update after ``num_averaged`` earlier updates."""
        return min(self.decay, (1.0 + num_averaged) / (10.0 + num_averaged))

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        d = self.current(int(num_averaged))
        return averaged + (current - averaged) * (1.0 - d)


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` with a warmed-up decay (default) and a checked ``decay``.

    Validation, preview samples and the checkpoints' ``state_dict`` use the averaged weights, as with Lightning's
    callback; ``last.ckpt`` also keeps the raw weights a resumed run continues from. With ``warmup`` the decay
    follows :class:`WarmupEMADecay`, so a short run is never dominated by the random initialisation.

    Args:
        decay: target decay in [0, 1): the average covers roughly the last ``1 / (1 - decay)`` updates.
        warmup: ramp the decay up as ``min(decay, (1 + n) / (10 + n))``; ``False`` uses ``decay`` from the first
            update (Lightning's behaviour).
        update_every_n_steps: average every N optimiser steps (3D MedDiffusion: 10).
        update_starting_at_step: first optimiser step that averages (3D MedDiffusion: 2000); until then the
            average is kept equal to the live weights, as 3D MedDiffusion does, so validation never sees the
            random initialisation.
        device: where the averaged copy lives (``"cpu"`` saves GPU memory); default the model's device.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        device: Optional[str] = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise MedsynthError(f"EMA decay={decay} must lie in [0, 1)")
        if update_every_n_steps < 1:
            raise MedsynthError(f"EMA update_every_n_steps={update_every_n_steps} must be >= 1")
        super().__init__(
            device=device,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = decay
        self.warmup = warmup
        if warmup:
            self._kwargs["avg_fn"] = WarmupEMADecay(decay)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        start = self.update_starting_at_step
        if start is not None and trainer.global_step - 1 < start and self._average_model is not None:
            with torch.no_grad():  # follow the live weights until averaging starts (no update counted)
                average = itertools.chain(self._average_model.module.parameters(), self._average_model.module.buffers())
                for a, c in zip(average, itertools.chain(pl_module.parameters(), pl_module.buffers())):
                    a.copy_(c)
