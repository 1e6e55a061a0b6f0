"""Diffusion maths: training objectives, the sampling loop, and conditioning encodings."""

from medsynth.diffusion.conditioning import ablate_mask, encode_mask
from medsynth.diffusion.objectives import DDPMObjective, Objective, RectifiedFlowObjective
from medsynth.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    HeunSampler,
    Sampler,
    UniPCSampler,
)

__all__ = ["Objective", "DDPMObjective", "RectifiedFlowObjective", "Sampler", "DDIMSampler", "DDPMSampler",
           "EulerSampler", "HeunSampler", "DPMSolverSampler", "UniPCSampler", "encode_mask", "ablate_mask"]
