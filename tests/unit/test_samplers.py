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


def test_euler_with_exact_velocity_recovers_the_data_point_in_few_steps():
    from medsynth.diffusion import EulerSampler, RectifiedFlowObjective

    obj = RectifiedFlowObjective()
    c = torch.full((1, 1, 4, 4), -0.4)

    def velocity(xt, t):
        s = (t / obj.num_train_timesteps).view(-1, 1, 1, 1)
        return (xt - c) / s

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = EulerSampler(4).sample(velocity, initial_noise((1, 4, 4), gens), obj, gens)
    assert torch.allclose(x, c.expand(2, -1, -1, -1), atol=1e-4)


def test_objective_and_sampler_must_match():
    from medsynth.diffusion import EulerSampler, RectifiedFlowObjective
    from medsynth.errors import MedsynthError

    with pytest.raises(MedsynthError, match="DDIMSampler cannot sample a RectifiedFlowObjective.*EulerSampler"):
        DDIMSampler().check(RectifiedFlowObjective())
    with pytest.raises(MedsynthError, match="EulerSampler cannot sample a DDPMObjective"):
        EulerSampler().check(DDPMObjective())
