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


# ---------------------------------------------------------------- DPM-Solver++, UniPC, Heun (issue #16)
from medsynth.diffusion import (  # noqa: E402
    DPMSolverSampler,
    EulerSampler,
    HeunSampler,
    RectifiedFlowObjective,
    UniPCSampler,
)
from medsynth.diffusion.analytic import ode_error as exact_ode_error  # noqa: E402
from medsynth.errors import MedsynthError  # noqa: E402


def ode_error(sampler, objective):
    return exact_ode_error(sampler, objective, size=6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_second_order_solvers_follow_the_exact_ode_closer_than_ddim(prediction_type):
    obj = DDPMObjective(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    ddim = ode_error(DDIMSampler(20, clip_sample=False), obj)
    for sampler in (DPMSolverSampler(20, clip_sample=False), UniPCSampler(20, clip_sample=False)):
        err = ode_error(sampler, obj)
        assert err < 0.01 and err < ddim / 10, (type(sampler).__name__, err, ddim)


def test_flow_solvers_follow_the_exact_ode():
    obj = RectifiedFlowObjective()
    euler = ode_error(EulerSampler(10), obj)
    assert ode_error(HeunSampler(10), obj) < min(0.01, euler / 10)  # 19 net evaluations against Euler's 10
    for sampler in (DPMSolverSampler(10, clip_sample=False), UniPCSampler(10, clip_sample=False)):  # flow sigmas
        assert ode_error(sampler, obj) < min(0.02, euler / 10)


@pytest.mark.parametrize("sampler", [DPMSolverSampler(8), UniPCSampler(8)])
def test_multistep_solvers_recover_a_data_point(sampler):
    obj = DDPMObjective()
    c = torch.full((1, 1, 4, 4), 0.3)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = sampler.sample(oracle(obj, c), initial_noise((1, 4, 4), gens), obj, gens)
    assert torch.allclose(x, c.expand(2, -1, -1, -1), atol=1e-3)


@pytest.mark.parametrize("sampler,objective", [
    (DPMSolverSampler(6), DDPMObjective()), (UniPCSampler(6), DDPMObjective()),
    (DPMSolverSampler(6), RectifiedFlowObjective()), (UniPCSampler(6), RectifiedFlowObjective()),
    (HeunSampler(4), RectifiedFlowObjective()),
])
def test_new_samplers_are_deterministic_given_the_seeds(sampler, objective):
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def denoise(xt, t):
        return torch.tanh(net(xt)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler.sample(denoise, initial_noise((1, 5, 5), gens), objective, gens)

    a, b = run([1, 2]), run([2])
    assert torch.isfinite(a).all() and torch.equal(a, run([1, 2]))
    assert torch.allclose(a[1], b[0], atol=1e-6)  # a sample depends on its own seed only
    assert not torch.allclose(a[0], a[1])


def test_clip_sample_clips_the_multistep_x0_estimates():
    obj = DDPMObjective()
    c = torch.full((1, 1, 4, 4), 2.5)  # outside [-1, 1]
    gens = [torch.Generator().manual_seed(0)]
    for cls in (DPMSolverSampler, UniPCSampler):
        clipped = cls(8).sample(oracle(obj, c), initial_noise((1, 4, 4), gens), obj, gens)
        free = cls(8, clip_sample=False).sample(oracle(obj, c), initial_noise((1, 4, 4), gens), obj, gens)
        assert clipped.max() <= 1.0 + 1e-5 and torch.allclose(free, c, atol=1e-3)


def test_heun_evaluates_the_net_twice_per_interval():
    calls = []
    obj = RectifiedFlowObjective()

    def velocity(xt, t):
        calls.append(float(t[0]))
        return torch.zeros_like(xt)

    HeunSampler(5).sample(velocity, torch.zeros(1, 1, 2, 2), obj)
    assert len(calls) == 9 and calls[0] == 1000.0


def test_resolution_shift_scales_with_the_voxel_count():
    from medsynth.diffusion.samplers import resolution_shift

    assert resolution_shift(1.0, [32, 32, 32], [64, 64, 64]) == pytest.approx(2.0)
    assert resolution_shift(3.0, [32, 32, 32], [16, 16, 16]) == pytest.approx(1.5)
    assert resolution_shift(3.0, None, [64, 64, 64]) == 3.0
    obj = RectifiedFlowObjective()
    small, large = (EulerSampler(10, shift_base_shape=[8, 8, 8]).make_scheduler(obj, (n, n, n)) for n in (8, 16))
    small.set_timesteps(10)
    large.set_timesteps(10)
    assert large.config.shift == pytest.approx(2.0) and (large.sigmas[1:-1] > small.sigmas[1:-1]).all()
    for sampler in (DPMSolverSampler(10, shift_base_shape=[8, 8, 8]), UniPCSampler(10, shift_base_shape=[8, 8, 8])):
        assert sampler.make_scheduler(obj, (16, 16, 16)).config.flow_shift == pytest.approx(2.0)


def test_incompatible_pairs_and_settings_are_refused_in_one_line():
    with pytest.raises(MedsynthError, match="HeunSampler cannot sample a DDPMObjective.*DPMSolverSampler"):
        HeunSampler().check(DDPMObjective())
    with pytest.raises(MedsynthError, match="num_inference_steps=2000 exceeds the objective's 1000 training"):
        DPMSolverSampler(2000).check(DDPMObjective())
    DPMSolverSampler().check(RectifiedFlowObjective())
    UniPCSampler().check(RectifiedFlowObjective())
    with pytest.raises(MedsynthError, match="solver_order=4"):
        UniPCSampler(solver_order=4)
    with pytest.raises(MedsynthError, match="shift=0"):
        DPMSolverSampler(shift=0)


def test_a_forced_progress_bar_counts_the_denoising_steps(capfd):
    obj = DDPMObjective()
    c = torch.zeros(1, 1, 2, 2)
    DDIMSampler(7, progress=True).sample(oracle(obj, c), torch.randn(1, 1, 2, 2), obj)
    err = capfd.readouterr().err
    assert "denoising (DDIMSampler)" in err and "7/7" in err
    DDIMSampler(7, progress=False).sample(oracle(obj, c), torch.randn(1, 1, 2, 2), obj)
    DDIMSampler(7).sample(oracle(obj, c), torch.randn(1, 1, 2, 2), obj)  # stderr is not a terminal here
    assert capfd.readouterr().err == ""
