"""Samplers: the one denoising loop every module uses, over a diffusers scheduler."""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from medsynth.diffusion.objectives import Objective
from medsynth.errors import MedsynthError

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoise(xt, t) -> net output`` for ``xt`` ``(B, C, *spatial)`` and timesteps ``t`` ``(B,)``."""


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device=None) -> Tensor:
    """Standard normal noise ``(B, *shape)``, one CPU generator per sample.

    Drawing each sample from its own generator makes a sample depend on its seed alone, not on batch size,
    device count or device type.
    """
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


class Sampler:
    """Base sampler: builds a scheduler matching the objective and runs the reverse process.

    Args:
        num_inference_steps: denoising steps.
        clip_sample: clip the scheduler's ``x0`` estimate to [-1, 1] at each step (right for images in [-1, 1],
            wrong for unbounded latents: the :class:`~medsynth.modules.DiffusionModule` turns it off for
            standardised latents whatever this says).
    """

    def __init__(self, num_inference_steps: int = 50, clip_sample: bool = True) -> None:
        if num_inference_steps < 1:
            raise MedsynthError(f"sampler.num_inference_steps={num_inference_steps} must be >= 1")
        self.num_inference_steps = num_inference_steps
        self.clip_sample = clip_sample

    family: str = "diffusion"
    """The objective family this sampler inverts (see :attr:`Objective.family`)."""

    def check(self, objective: Objective) -> None:
        """Refuse an objective this sampler cannot invert (before any training or sampling starts)."""
        if objective.family != self.family:
            hint = "EulerSampler" if objective.family == "flow" else "DDIMSampler or DDPMSampler"
            raise MedsynthError(
                f"model.sampler {type(self).__name__} cannot sample a {type(objective).__name__} model "
                f"({objective.family} objective); use medsynth.diffusion.{hint}"
            )

    def make_scheduler(self, objective: Objective):
        raise NotImplementedError

    def with_settings(self, **changes) -> "Sampler":
        """A copy with some settings changed, e.g. ``clip_sample=False`` for unbounded latents; ``self`` is untouched
        (the module's sampler is shared by predict and previews)."""
        unknown = set(changes) - set(vars(self))
        if unknown:
            raise MedsynthError(f"{type(self).__name__} has no setting {', '.join(sorted(unknown))}")
        new = copy.copy(self)
        vars(new).update(changes)
        return new

    def step_kwargs(self, generators: Optional[Sequence[torch.Generator]]) -> dict:
        return {"generator": list(generators) if generators is not None else None}

    def describe(self) -> dict:
        """The sampler's settings, for sample metadata."""
        return {"class": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        noise: Tensor,
        objective: Objective,
        generators: Optional[Sequence[torch.Generator]] = None,
    ) -> Tensor:
        """Run the reverse process from ``noise`` ``(B, C, *spatial)`` and return the final sample (same shape).

        Args:
            denoise: the conditioned net, see :data:`Denoiser`.
            noise: the starting point, standard normal.
            objective: the objective the net was trained with (schedule and prediction type).
            generators: one CPU generator per sample for stochastic steps (DDPM, DDIM with eta > 0).
        """
        self.check(objective)
        scheduler = self.make_scheduler(objective)
        scheduler.set_timesteps(self.num_inference_steps, device=noise.device)
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = denoise(x_in, t.expand(x.shape[0])).float()
            x = scheduler.step(out, t, x, **self.step_kwargs(generators)).prev_sample
        return x


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al., 2020); ``num_inference_steps`` below the training steps skips levels.

    Args:
        num_inference_steps: denoising steps (1000 reproduces training's schedule exactly).
        clip_sample: see :class:`Sampler`.
    """

    def __init__(self, num_inference_steps: int = 1000, clip_sample: bool = True) -> None:
        super().__init__(num_inference_steps, clip_sample)

    def make_scheduler(self, objective: Objective) -> DDPMScheduler:
        return DDPMScheduler(**objective.scheduler_config(), clip_sample=self.clip_sample)


class DDIMSampler(Sampler):
    """Denoising diffusion implicit models (Song et al., 2021): few steps, deterministic at ``eta=0``.

    Args:
        num_inference_steps: denoising steps (the reference pipeline uses 50).
        eta: noise added per step; 0 is deterministic DDIM, 1 matches DDPM's variance.
        clip_sample: see :class:`Sampler`.
    """

    def __init__(self, num_inference_steps: int = 50, eta: float = 0.0, clip_sample: bool = True) -> None:
        super().__init__(num_inference_steps, clip_sample)
        if eta < 0:
            raise MedsynthError(f"sampler.eta={eta} must be >= 0")
        self.eta = eta

    def make_scheduler(self, objective: Objective) -> DDIMScheduler:
        return DDIMScheduler(**objective.scheduler_config(), clip_sample=self.clip_sample)

    def step_kwargs(self, generators):
        return {"eta": self.eta, **super().step_kwargs(generators)}


class EulerSampler(Sampler):
    """Euler integration of a rectified-flow velocity from noise (s = 1) to data (s = 0); deterministic.

    Args:
        num_inference_steps: Euler steps (rectified flow works with few, e.g. 10).
        shift: timestep shift of diffusers' ``FlowMatchEulerDiscreteScheduler``; values above 1 spend more steps
            at high noise.
    """

    family = "flow"

    def __init__(self, num_inference_steps: int = 10, shift: float = 1.0) -> None:
        super().__init__(num_inference_steps, clip_sample=False)
        self.shift = shift

    def make_scheduler(self, objective: Objective) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(**objective.scheduler_config(), shift=self.shift)

    def step_kwargs(self, generators):
        return {}
