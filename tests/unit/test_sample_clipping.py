"""Samples are clipped to [-1, 1] only where the data is bounded: pixels and min-max scaled latents (issue #15.1).

The data is one constant image ``c = 2.5``, outside [-1, 1], as a standardised latent can be; an exact denoiser for it
lets every sampler reach ``c`` unless something clips on the way.
"""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medsynth.diffusion import (
    DDIMSampler,
    DDPMObjective,
    DDPMSampler,
    EulerSampler,
    RectifiedFlowObjective,
)
from medsynth.modules import DiffusionModule

C = 2.5


class ExactNet(nn.Module):
    """The exact net output for data that is always the constant image ``C`` (epsilon or rectified-flow velocity)."""

    def __init__(self, in_channels: int, out_channels: int, objective=None) -> None:
        super().__init__()
        self.objective = objective
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, xt, t):
        if isinstance(self.objective, RectifiedFlowObjective):  # xt = (1 - s) C + s eps, velocity eps - C
            s = (t.float() / self.objective.num_train_timesteps).view(-1, 1, 1, 1)
            return (xt - C) / s
        a = self.objective.alphas_cumprod[t.long().cpu()].view(-1, 1, 1, 1)  # xt = sqrt(a) C + sqrt(1 - a) eps
        return (xt - a.sqrt() * C) / (1 - a).sqrt()


PAIRS = [
    (DDPMObjective, lambda: DDIMSampler(10)),
    (DDPMObjective, lambda: DDPMSampler(50)),
    (RectifiedFlowObjective, lambda: EulerSampler(4)),
]
LATENTS = {"shift": 0.0, "scale": 1.0, "latent_channels": 1, "downsample_factor": 4}


def module(objective_class, sampler, latent_space):
    objective = objective_class()
    return DiffusionModule(net=partial(ExactNet, objective=objective), objective=objective, sampler=sampler,
                           image_size=4, latent_space=latent_space).eval()


@pytest.mark.parametrize("objective_class,make_sampler", PAIRS)
def test_standardised_latents_are_never_clipped(objective_class, make_sampler):
    m = module(objective_class, make_sampler(), dict(LATENTS, method="std"))
    x = m.sample(indices=[0, 1])
    assert torch.allclose(x, torch.full_like(x, C), atol=1e-2)


@pytest.mark.parametrize("objective_class,make_sampler", PAIRS)
@pytest.mark.parametrize("latent_space", [None, dict(LATENTS, method="minmax")], ids=["pixels", "minmax"])
def test_pixels_and_minmax_latents_are_clipped_to_their_range(objective_class, make_sampler, latent_space):
    x = module(objective_class, make_sampler(), latent_space).sample(indices=[0, 1])
    assert x.max() == 1.0 and x.min() >= -1.0


def test_the_scaling_is_read_from_the_attached_latent_manifest_when_the_model_args_do_not_name_it():
    m = module(DDPMObjective, DDIMSampler(10), dict(LATENTS))  # a latent_space without "method"
    m._trainer = SimpleNamespace(datamodule=SimpleNamespace(info={"scaling": {"method": "std"}}), predicting=True)
    assert torch.allclose(m.sample(indices=[0]), torch.full((1, 1, 4, 4), C), atol=1e-2)
