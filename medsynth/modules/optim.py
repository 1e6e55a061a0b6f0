"""What every medsynth LightningModule shares about optimisation: the optimiser plug-in and the warm-up schedule."""

from __future__ import annotations

import functools
from typing import Callable, Literal

import torch
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from torch.optim.optimizer import ParamsT


def plain_callable(fn: Callable) -> Callable:
    """Strip jsonargparse's instantiation wrapper from a class callable, keeping the class and its arguments.

    The wrapper holds the CLI (and, under DDP, thread locks), which makes the module impossible to deep-copy, and
    EMA deep-copies the module.
    """
    if (
        isinstance(fn, functools.partial)
        and getattr(fn.func, "__module__", "").startswith("jsonargparse")
        and len(fn.args) >= 2
        and isinstance(fn.args[1], type)
    ):
        return functools.partial(fn.args[1], *fn.args[2:], **fn.keywords)
    return fn


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps,
                    schedule: Literal["cosine", "constant"] = "cosine") -> dict:
    """A per-step learning-rate schedule: linear warm-up over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps`` (the Trainer's ``estimated_stepping_batches``) or constant; constant when the run's length is
    unknown. Returns Lightning's ``lr_scheduler`` config."""
    warmup = max(int(warmup_steps), 0)
    if schedule == "cosine" and total_steps not in (None, float("inf")):
        sched = get_cosine_schedule_with_warmup(optimizer, warmup, int(total_steps))
    else:
        sched = get_constant_schedule_with_warmup(optimizer, warmup)
    return {"scheduler": sched, "interval": "step"}


class GANAdam(torch.optim.Adam):
    """Adam with the betas of GAN practice, (0.5, 0.9) (VQGAN, 3D MedDiffusion): the default optimiser of the
    autoencoders, whose generator and discriminator train against each other."""

    def __init__(self, params: ParamsT, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.9), **kwargs) -> None:
        super().__init__(params, lr=lr, betas=betas, **kwargs)
