"""Samplers: the one denoising loop every module uses, over a diffusers scheduler.

A sampler is a plug-in (``model.sampler`` in YAML): it builds the diffusers scheduler that inverts the model's
objective (:meth:`Sampler.make_scheduler`) and runs :meth:`Sampler.sample`, which is the same loop for all of them.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor

from medsynth.diffusion.objectives import Objective
from medsynth.errors import MedsynthError
from medsynth.nets.tiling import progress_bar

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoise(xt, t) -> net output`` for ``xt`` ``(B, C, *spatial)`` and timesteps ``t`` ``(B,)``."""

SAMPLERS_FOR = {
    "diffusion": "DDIMSampler, DDPMSampler, DPMSolverSampler or UniPCSampler",
    "flow": "EulerSampler, HeunSampler, DPMSolverSampler or UniPCSampler",
}
"""What to suggest when a sampler cannot invert an objective family (a hint in an error message, not a registry)."""


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by ``(seed, dataset index)``: a sample depends on nothing else."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device=None) -> Tensor:
    """Standard normal noise ``(B, *shape)``, one CPU generator per sample.

    Drawing each sample from its own generator makes a sample depend on its seed alone, not on batch size,
    device count or device type.
    """
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def resolution_shift(shift: float, base_shape: Optional[Sequence[int]], spatial_shape: Sequence[int]) -> float:
    """The rectified-flow timestep shift for samples of ``spatial_shape``, scaled from ``base_shape``.

    ``shift * (N / N_base) ** (1 / spatial_dims)`` for ``N`` voxels (``N_base`` in the base shape), as MONAI's
    ``RFlowScheduler(use_timestep_transform=True)`` does for MAISI (after Esser et al., 2024, "Scaling Rectified Flow
    Transformers for High-Resolution Image Synthesis", §5.3.2: more voxels keep more signal at a given noise level,
    so larger samples need more steps at high noise). ``base_shape=None`` returns ``shift`` unchanged.
    """
    if base_shape is None or not spatial_shape:
        return float(shift)
    ratio = math.prod(int(s) for s in spatial_shape) / math.prod(int(s) for s in base_shape)
    return float(shift) * ratio ** (1.0 / len(spatial_shape))


def _check_flow_shift(shift: float, base_shape: Optional[Sequence[int]]) -> None:
    if shift <= 0:
        raise MedsynthError(f"sampler.shift={shift} must be positive")
    if base_shape is not None and (len(base_shape) == 0 or min(int(s) for s in base_shape) < 1):
        raise MedsynthError(f"sampler.shift_base_shape={list(base_shape)} must be positive sizes, one per axis")


def _clip_x0(scheduler):
    """Make a multistep scheduler built with ``thresholding=True`` clip its ``x0`` estimates to [-1, 1], as DDIM's
    ``clip_sample`` does. Dynamic thresholding (Saharia et al., 2022) with ``sample_max_value=1`` computes the same
    clip, but through a per-sample quantile, which costs a sort and which torch refuses above 2**24 elements."""
    scheduler._threshold_sample = lambda x0: x0.clamp(-1.0, 1.0)
    return scheduler


class Sampler:
    """Base sampler: builds a scheduler matching the objective and runs the reverse process.

    Args:
        num_inference_steps: denoising steps.
        clip_sample: clip the scheduler's ``x0`` estimate to [-1, 1] at each step (right for images in [-1, 1],
            wrong for unbounded latents: the :class:`~medsynth.modules.DiffusionModule` turns it off for
            standardised latents whatever this says).
        progress: a progress bar over the denoising steps of each batch (and over decoding tiles) on stderr:
            ``None`` shows it when stderr is a terminal, ``False`` never, ``True`` always. Previews during training
            never show one.
    """

    families: tuple[str, ...] = ("diffusion",)
    """The objective families this sampler inverts (see :attr:`Objective.family`)."""

    def __init__(self, num_inference_steps: int = 50, clip_sample: bool = True,
                 progress: Optional[bool] = None) -> None:
        if num_inference_steps < 1:
            raise MedsynthError(f"sampler.num_inference_steps={num_inference_steps} must be >= 1")
        self.num_inference_steps = num_inference_steps
        self.clip_sample = clip_sample
        self.progress = progress

    def check(self, objective: Objective) -> None:
        """Refuse an objective this sampler cannot invert (before any training or sampling starts)."""
        if objective.family not in self.families:
            raise MedsynthError(
                f"model.sampler {type(self).__name__} cannot sample a {type(objective).__name__} model "
                f"({objective.family} objective); use medsynth.diffusion.{SAMPLERS_FOR.get(objective.family, '?')}"
            )
        if objective.family == "diffusion" and self.num_inference_steps > objective.num_train_timesteps:
            raise MedsynthError(
                f"model.sampler.num_inference_steps={self.num_inference_steps} exceeds the objective's "
                f"{objective.num_train_timesteps} training timesteps"
            )

    def make_scheduler(self, objective: Objective, spatial_shape: Sequence[int] = ()):
        """The diffusers scheduler that inverts ``objective`` for samples of ``spatial_shape``."""
        raise NotImplementedError

    def step_kwargs(self, generators: Optional[Sequence[torch.Generator]]) -> dict:
        return {"generator": list(generators) if generators is not None else None}

    def with_settings(self, **changes) -> "Sampler":
        """A copy with some settings changed, e.g. ``clip_sample=False`` for unbounded latents; ``self`` is untouched
        (the module's sampler is shared by predict and previews)."""
        unknown = set(changes) - set(vars(self))
        if unknown:
            raise MedsynthError(f"{type(self).__name__} has no setting {', '.join(sorted(unknown))}")
        new = copy.copy(self)
        vars(new).update(changes)
        return new

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
            denoise: the conditioned net, see :data:`Denoiser`; called once per scheduler timestep (second-order
                samplers such as Heun evaluate it about twice per step).
            noise: the starting point, standard normal.
            objective: the objective the net was trained with (schedule and prediction type).
            generators: one CPU generator per sample for stochastic steps (DDPM, DDIM with eta > 0).
        """
        self.check(objective)
        scheduler = self.make_scheduler(objective, tuple(noise.shape[2:]))
        scheduler.set_timesteps(self.num_inference_steps, device=noise.device)
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        steps = progress_bar(scheduler.timesteps, self.progress, f"denoising ({type(self).__name__})", "step")
        for t in steps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = denoise(x_in, t.expand(x.shape[0])).float()
            x = scheduler.step(out, t, x, **self.step_kwargs(generators)).prev_sample
        return x


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al., 2020); ``num_inference_steps`` below the training steps skips levels.

    Args:
        num_inference_steps: denoising steps (1000 reproduces training's schedule exactly).
        clip_sample: see :class:`Sampler`.
        progress: see :class:`Sampler`.
    """

    def __init__(self, num_inference_steps: int = 1000, clip_sample: bool = True,
                 progress: Optional[bool] = None) -> None:
        super().__init__(num_inference_steps, clip_sample, progress)

    def make_scheduler(self, objective: Objective, spatial_shape: Sequence[int] = ()) -> DDPMScheduler:
        return DDPMScheduler(**objective.scheduler_config(), clip_sample=self.clip_sample)


class DDIMSampler(Sampler):
    """Denoising diffusion implicit models (Song et al., 2021): few steps, deterministic at ``eta=0``.

    Args:
        num_inference_steps: denoising steps (the reference pipeline uses 50).
        eta: noise added per step; 0 is deterministic DDIM, 1 matches DDPM's variance.
        clip_sample: see :class:`Sampler`.
        progress: see :class:`Sampler`.
    """

    def __init__(self, num_inference_steps: int = 50, eta: float = 0.0, clip_sample: bool = True,
                 progress: Optional[bool] = None) -> None:
        super().__init__(num_inference_steps, clip_sample, progress)
        if eta < 0:
            raise MedsynthError(f"sampler.eta={eta} must be >= 0")
        self.eta = eta

    def make_scheduler(self, objective: Objective, spatial_shape: Sequence[int] = ()) -> DDIMScheduler:
        return DDIMScheduler(**objective.scheduler_config(), clip_sample=self.clip_sample)

    def step_kwargs(self, generators):
        return {"eta": self.eta, **super().step_kwargs(generators)}


class EulerSampler(Sampler):
    """Euler integration of a rectified-flow velocity from noise (s = 1) to data (s = 0); deterministic.

    Args:
        num_inference_steps: Euler steps (rectified flow works with few, e.g. 10).
        shift: timestep shift of diffusers' ``FlowMatchEulerDiscreteScheduler``, ``s -> shift s / (1 + (shift - 1)
            s)``; values above 1 spend more steps at high noise.
        shift_base_shape: the sample shape (latent voxels per axis) at which ``shift`` applies; other shapes scale
            it with their voxel count (see :func:`resolution_shift`), e.g. ``[32, 32, 32]`` as MAISI does for 3D
            latents of varying size. ``None``: the same shift for every size.
        progress: see :class:`Sampler`.
    """

    families = ("flow",)

    def __init__(self, num_inference_steps: int = 10, shift: float = 1.0,
                 shift_base_shape: Optional[list[int]] = None, progress: Optional[bool] = None) -> None:
        super().__init__(num_inference_steps, clip_sample=False, progress=progress)
        _check_flow_shift(shift, shift_base_shape)
        self.shift = shift
        self.shift_base_shape = list(shift_base_shape) if shift_base_shape is not None else None

    def make_scheduler(self, objective: Objective, spatial_shape: Sequence[int] = ()) -> FlowMatchEulerDiscreteScheduler:
        shift = resolution_shift(self.shift, self.shift_base_shape, spatial_shape)
        return FlowMatchEulerDiscreteScheduler(**objective.scheduler_config(), shift=shift)

    def step_kwargs(self, generators):
        return {}


class HeunSampler(EulerSampler):
    """Heun's second-order integration of a rectified-flow velocity (Karras et al., 2022, "Elucidating the Design
    Space of Diffusion-Based Generative Models", Alg. 1 without churn), diffusers' ``FlowMatchHeunDiscreteScheduler``.

    ``num_inference_steps`` counts noise levels: the net is evaluated ``2 * num_inference_steps - 1`` times (each
    interval twice, the last step to zero noise once, as Euler).

    Args:
        num_inference_steps: noise levels (about half the net evaluations of an Euler sampler of equal cost).
        shift: see :class:`EulerSampler`.
        shift_base_shape: see :class:`EulerSampler`.
        progress: see :class:`Sampler`.
    """

    def make_scheduler(self, objective: Objective, spatial_shape: Sequence[int] = ()) -> FlowMatchHeunDiscreteScheduler:
        shift = resolution_shift(self.shift, self.shift_base_shape, spatial_shape)
        return FlowMatchHeunDiscreteScheduler(**objective.scheduler_config(), shift=shift)


class _MultistepSampler(Sampler):
    """A multistep solver that inverts both families: the DDPM schedule of a diffusion objective, or rectified flow
    through diffusers' flow sigmas (``use_flow_sigmas``, ``prediction_type="flow_prediction"``)."""

    families = ("diffusion", "flow")
    scheduler_class: type

    def __init__(self, num_inference_steps: int, solver_order: int, clip_sample: bool, shift: float,
                 shift_base_shape: Optional[list[int]], progress: Optional[bool]) -> None:
        super().__init__(num_inference_steps, clip_sample, progress)
        if solver_order not in (1, 2, 3):
            raise MedsynthError(f"sampler.solver_order={solver_order} must be 1, 2 or 3")
        _check_flow_shift(shift, shift_base_shape)
        self.solver_order = solver_order
        self.shift = shift
        self.shift_base_shape = list(shift_base_shape) if shift_base_shape is not None else None

    def scheduler_kwargs(self) -> dict:
        return {"solver_order": self.solver_order}

    def make_scheduler(self, objective: Objective, spatial_shape: Sequence[int] = ()):
        config = dict(objective.scheduler_config(), **self.scheduler_kwargs())
        if objective.family == "flow":
            config.update(use_flow_sigmas=True, prediction_type="flow_prediction",
                          flow_shift=resolution_shift(self.shift, self.shift_base_shape, spatial_shape))
        if not self.clip_sample:
            return self.scheduler_class(**config)
        return _clip_x0(self.scheduler_class(**config, thresholding=True, sample_max_value=1.0))

    def step_kwargs(self, generators):
        return {}


class DPMSolverSampler(_MultistepSampler):
    """DPM-Solver++ multistep (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models"), diffusers' ``DPMSolverMultistepScheduler``: a second-order (2M) ODE solver in data
    prediction, good in 10-20 steps and with classifier-free guidance; deterministic.

    Inverts DDPM objectives (any prediction type) and rectified flow, through flow sigmas (as the Wan and SANA
    pipelines of diffusers do); with fewer than 15 steps the last steps drop to first order, which keeps few-step
    sampling stable.

    Args:
        num_inference_steps: denoising steps (net evaluations).
        solver_order: 2 (2M; recommended with guidance), 3 for unconditional models, 1 (DDIM-like).
        clip_sample: clip each ``x0`` estimate to [-1, 1], see :class:`Sampler`.
        shift: rectified flow only: timestep shift of the flow sigmas, see :class:`EulerSampler`.
        shift_base_shape: rectified flow only, see :class:`EulerSampler`.
        progress: see :class:`Sampler`.
    """

    scheduler_class = DPMSolverMultistepScheduler

    def __init__(self, num_inference_steps: int = 20, solver_order: int = 2, clip_sample: bool = True,
                 shift: float = 1.0, shift_base_shape: Optional[list[int]] = None,
                 progress: Optional[bool] = None) -> None:
        super().__init__(num_inference_steps, solver_order, clip_sample, shift, shift_base_shape, progress)

    def scheduler_kwargs(self) -> dict:
        return {"solver_order": self.solver_order, "algorithm_type": "dpmsolver++"}


class UniPCSampler(_MultistepSampler):
    """UniPC (Zhao et al., 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models"), diffusers' ``UniPCMultistepScheduler`` (B(h) = e^h - 1, data prediction): each step's corrector
    reuses the net evaluation of the next, so it costs what DPM-Solver++ costs; strong at 5-10 steps;
    deterministic.

    Inverts DDPM objectives (any prediction type) and rectified flow, through flow sigmas.

    Args:
        num_inference_steps: denoising steps (net evaluations).
        solver_order: predictor order; 2 is recommended with guidance, 3 for unconditional models.
        clip_sample: clip each ``x0`` estimate to [-1, 1], see :class:`Sampler`.
        shift: rectified flow only: timestep shift of the flow sigmas, see :class:`EulerSampler`.
        shift_base_shape: rectified flow only, see :class:`EulerSampler`.
        progress: see :class:`Sampler`.
    """

    scheduler_class = UniPCMultistepScheduler

    def __init__(self, num_inference_steps: int = 10, solver_order: int = 2, clip_sample: bool = True,
                 shift: float = 1.0, shift_base_shape: Optional[list[int]] = None,
                 progress: Optional[bool] = None) -> None:
        super().__init__(num_inference_steps, solver_order, clip_sample, shift, shift_base_shape, progress)

    def scheduler_kwargs(self) -> dict:
        return {"solver_order": self.solver_order, "predict_x0": True, "solver_type": "bh2"}
