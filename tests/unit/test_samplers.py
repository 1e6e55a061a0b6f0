import pytest
import torch

from medsynth.diffusion.objectives import DDPMObjective
from medsynth.diffusion.samplers import DDIMSampler, DDPMSampler, initial_noise


def oracle(objective, c):
    """The exact epsilon-predictor for data that is always the constant image ``c``."""
    abar = objective.alphas_cumprod

    def denoise(xt, t):
        a = abar[t.cpu()].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * c) / (1 - a).sqrt()

    return denoise


@pytest.mark.parametrize("sampler", [DDIMSampler(20), DDIMSampler(20, eta=1.0), DDPMSampler(100)])
def test_sampler_with_exact_denoiser_recovers_the_data_point(sampler):
    obj = DDPMObjective()
    c = torch.full((1, 1, 4, 4), 0.3)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x = sampler.sample(oracle(obj, c), initial_noise((1, 4, 4), gens), obj, gens)
    assert torch.allclose(x, c.expand(3, -1, -1, -1), atol=1e-2)


def test_initial_noise_depends_only_on_each_sample_seed():
    a = initial_noise((2, 3), [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    b = initial_noise((2, 3), [torch.Generator().manual_seed(s) for s in (7,)])
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMSampler(0)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(10, eta=-1)
