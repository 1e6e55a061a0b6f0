"""Diffusion maths: training objectives, the sampling loop, and conditioning encodings."""

from medsynth.diffusion.conditioning import ablate_mask, encode_mask
from medsynth.diffusion.objectives import DDPMObjective, Objective
from medsynth.diffusion.samplers import DDIMSampler, DDPMSampler, Sampler

__all__ = ["Objective", "DDPMObjective", "Sampler", "DDIMSampler", "DDPMSampler", "encode_mask", "ablate_mask"]
