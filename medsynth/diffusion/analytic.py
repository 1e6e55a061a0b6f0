"""An exact reference for samplers: Gaussian data, whose denoiser is linear and whose probability-flow ODE has a
closed form. A sampler run on this denoiser shows its own discretisation error, free of any training noise (the
tests and ``benchmarks/sampler_speed.py --analytic`` use it; check a new sampler the same way)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from medsynth.diffusion.objectives import Objective
from medsynth.diffusion.samplers import Sampler, initial_noise


def gaussian_denoiser(objective: Objective, mu: float = 0.3, sd: float = 0.5
                      ) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """The exact net output for data N(``mu``, ``sd``²) per pixel under ``objective`` (any DDPM prediction type, or
    the rectified-flow velocity), and the exact end point of the ODE.

    Returns:
        ``denoise(xt, t)``, the net a sampler integrates, and ``exact(z, t0)``: where the ODE started at ``z`` at
        timestep ``t0`` ends (float64).
    """
    flow = objective.family == "flow"

    def coefficients(t: Tensor) -> tuple[Tensor, Tensor]:  # xt = a x0 + s eps
        if flow:
            s = t.double() / objective.num_train_timesteps
            return 1 - s, s
        abar = objective.alphas_cumprod.double()[t.long().cpu()]
        return abar.sqrt(), (1 - abar).sqrt()

    def denoise(xt: Tensor, t: Tensor) -> Tensor:
        a, s = (v.view(-1, 1, 1, 1) for v in coefficients(t))
        xt = xt.double()
        x0 = mu + a * sd**2 / (a**2 * sd**2 + s**2) * (xt - a * mu)  # E[x0 | xt]
        eps = (xt - a * x0) / s
        if flow:
            return (eps - x0).float()
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[objective.prediction_type].float()

    def exact(z: Tensor, t0) -> Tensor:
        a, s = coefficients(torch.as_tensor([t0]))
        return mu + sd * (z.double() - a * mu) / (a**2 * sd**2 + s**2).sqrt()  # the standardised coordinate is kept

    return denoise, exact


def ode_error(sampler: Sampler, objective: Objective, size: int = 8, seeds: Sequence[int] = range(3),
              mu: float = 0.3, sd: float = 0.5) -> float:
    """Largest distance between ``sampler``'s result and the exact ODE end point for Gaussian data, over one
    ``size`` × ``size`` sample per seed."""
    gens = [torch.Generator().manual_seed(i) for i in seeds]
    z = initial_noise((1, size, size), gens)
    scheduler = sampler.make_scheduler(objective, (size, size))
    scheduler.set_timesteps(sampler.num_inference_steps)
    denoise, exact = gaussian_denoiser(objective, mu, sd)
    x = sampler.sample(denoise, z, objective, gens)
    return float((x.double() - exact(z, scheduler.timesteps[0])).abs().max())
