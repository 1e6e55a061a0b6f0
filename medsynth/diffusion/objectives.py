"""Training objectives: what the net is asked to predict from a noised sample, and how each sample is weighted."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from medsynth.errors import MedsynthError

PredictionType = Literal["epsilon", "v_prediction", "sample"]
RegressionLoss = Literal["mse", "l1"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample ``(B,)`` tensor to broadcast over ``(B, C, *spatial)``."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like)


class Objective:
    """A diffusion training objective: noising, regression target and per-sample loss weight.

    Subclasses define the forward process; samplers read :meth:`scheduler_config` so that sampling inverts the
    same process the net was trained on.
    """

    num_train_timesteps: int
    loss: RegressionLoss = "mse"
    """The per-element error between prediction and target: squared (``mse``) or absolute (``l1``)."""
    family: str = "diffusion"
    """Which samplers can invert it: ``diffusion`` (DDPM, DDIM, DPM-Solver++, UniPC) or ``flow`` (Euler, Heun,
    DPM-Solver++ and UniPC with flow sigmas)."""

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Uniform training timesteps ``(B,)`` int64 in ``[0, num_train_timesteps)`` (on the CPU)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The noised sample ``xt`` for clean ``x0`` ``(B, C, *spatial)``, ``noise`` like it, timesteps ``t`` ``(B,)``."""
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the net should output for ``xt = add_noise(x0, noise, t)``."""
        raise NotImplementedError

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight ``(B,)`` of the error at timesteps ``t``."""
        return torch.ones(t.shape[0])

    def error(self, pred: Tensor, target: Tensor) -> Tensor:
        """The per-element error ``(B, C, *spatial)`` of ``pred`` against ``target`` (see :attr:`loss`)."""
        return (pred - target).abs() if self.loss == "l1" else (pred - target).square()

    def scheduler_config(self) -> dict:
        """Keyword arguments for a diffusers scheduler describing the same noise process."""
        raise NotImplementedError


class DDPMObjective(Objective):
    """Discrete-time denoising diffusion (Ho et al., 2020, "Denoising Diffusion Probabilistic Models").

    ``xt = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the cumulative product ``abar_t`` of ``1 - beta_t``.

    Args:
        prediction_type: the net predicts the noise ``eps`` (``epsilon``, Ho et al.), the velocity
            ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (``v_prediction``, Salimans & Ho, 2022) or ``x0``
            (``sample``).
        num_train_timesteps: number of discrete noise levels ``T``.
        beta_schedule: ``linear`` (Ho et al.), ``scaled_linear`` or ``squaredcos_cap_v2`` (cosine; Nichol &
            Dhariwal, 2021).
        beta_start: first beta of the linear schedules.
        beta_end: last beta of the linear schedules.
        min_snr_gamma: if set, weight each sample's loss by Min-SNR-gamma (Hang et al., 2023): ``min(SNR, gamma)``
            divided by ``SNR`` (epsilon), ``SNR + 1`` (v) or 1 (x0); 5 is the paper's choice. ``None``: uniform.
        loss: ``mse`` (squared error, Ho et al.) or ``l1`` (absolute error, as 3D MedDiffusion trains BiFlowNet).
        max_beta: the cap on the cosine schedule's betas: 0.999 (Nichol & Dhariwal, diffusers) or 0.9999
            (3D MedDiffusion; it changes only the last step, ``abar`` at ``t = T - 1``).
    """

    def __init__(
        self,
        prediction_type: PredictionType = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        min_snr_gamma: Optional[float] = None,
        loss: RegressionLoss = "mse",
        max_beta: float = 0.999,
    ) -> None:
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise MedsynthError(f"objective.min_snr_gamma={min_snr_gamma} must be positive")
        if loss not in ("mse", "l1"):
            raise MedsynthError(f"objective.loss must be 'mse' or 'l1', got {loss!r}")
        self.loss = loss
        if not 0.0 < max_beta < 1.0:
            raise MedsynthError(f"objective.max_beta={max_beta} must lie in (0, 1)")
        self.max_beta = max_beta
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.min_snr_gamma = min_snr_gamma
        self._scheduler = DDPMScheduler(**self.scheduler_config())
        self.alphas_cumprod = self._scheduler.alphas_cumprod.float()  # (T,) abar_t

    def scheduler_config(self) -> dict:
        config = dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
        )
        if self.beta_schedule == "squaredcos_cap_v2" and self.max_beta != 0.999:  # diffusers fixes the cap at 0.999
            from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

            config["trained_betas"] = betas_for_alpha_bar(self.num_train_timesteps, self.max_beta).tolist()
        return config

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t.cpu()]
        return _expand(abar.sqrt(), like), _expand((1 - abar).sqrt(), like)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at timesteps ``t`` ``(B,)``."""
        abar = self.alphas_cumprod[t.cpu()]
        return abar / (1 - abar)

    def loss_weight(self, t: Tensor) -> Tensor:
        if self.min_snr_gamma is None:
            return torch.ones(t.shape[0])
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped


class RectifiedFlowObjective(Objective):
    """Rectified flow / flow matching (Liu et al., 2023; Lipman et al., 2023): straight paths from data to noise.

    ``xt = (1 - s) x0 + s eps`` with ``s = t / T`` in [0, 1]; the net predicts the velocity ``eps - x0``, which
    Euler steps integrate from ``s = 1`` to 0 (few steps suffice). The net receives ``t = s * T`` as a float.

    Args:
        num_train_timesteps: ``T``, the scale of the timestep fed to the net.
        timestep_sampling: ``uniform`` s, or ``logit_normal`` (Esser et al., 2024), which favours mid-path s.
    """

    family = "flow"

    def __init__(
        self, num_train_timesteps: int = 1000, timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    ) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.timestep_sampling = timestep_sampling

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.timestep_sampling == "logit_normal":
            s = torch.sigmoid(torch.randn(batch_size, generator=generator))
        else:
            s = torch.rand(batch_size, generator=generator)
        return s * self.num_train_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = _expand(t.float() / self.num_train_timesteps, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def scheduler_config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps}
