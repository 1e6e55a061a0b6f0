import torch

from medsynth.diffusion.objectives import DDPMObjective


def _abar(obj, t):
    betas = torch.linspace(obj.beta_start, obj.beta_end, obj.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[t].float()


def test_linear_schedule_and_noising_match_closed_form():
    obj = DDPMObjective()
    x0, noise = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    abar = _abar(obj, t).view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(obj.add_noise(x0, noise, t), expected, atol=1e-5)


def test_targets_for_each_prediction_type():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 300, 900])
    assert torch.equal(DDPMObjective("epsilon").target(x0, noise, t), noise)
    assert torch.equal(DDPMObjective("sample").target(x0, noise, t), x0)
    obj = DDPMObjective("v_prediction")
    abar = _abar(obj, t).view(-1, 1, 1, 1)
    assert torch.allclose(obj.target(x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-5)


def test_min_snr_weights():
    t = torch.tensor([0, 100, 999])
    snr = DDPMObjective().snr(t)
    assert torch.allclose(DDPMObjective().loss_weight(t), torch.ones(3))
    w_eps = DDPMObjective("epsilon", min_snr_gamma=5.0).loss_weight(t)
    assert torch.allclose(w_eps, snr.clamp(max=5.0) / snr)
    assert w_eps[0] < 1e-2 and w_eps[2] == 1.0  # easy (high-SNR) steps are down-weighted
    w_v = DDPMObjective("v_prediction", min_snr_gamma=5.0).loss_weight(t)
    assert torch.allclose(w_v, snr.clamp(max=5.0) / (snr + 1))


def test_cosine_schedule_differs_from_linear():
    t = torch.tensor([500])
    assert not torch.allclose(DDPMObjective(beta_schedule="squaredcos_cap_v2").snr(t), DDPMObjective().snr(t))


def test_rectified_flow_interpolates_and_targets_the_velocity():
    from medsynth.diffusion.objectives import RectifiedFlowObjective

    obj = RectifiedFlowObjective(num_train_timesteps=1000)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.0, 250.0, 1000.0])
    xt = obj.add_noise(x0, noise, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(obj.target(x0, noise, t), noise - x0)
    ts = obj.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert ts.dtype == torch.float32 and 0 <= ts.min() and ts.max() <= 1000 and 400 < ts.mean() < 600
    ln = RectifiedFlowObjective(timestep_sampling="logit_normal").sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert ((ln > 250) & (ln < 750)).float().mean() > ((ts > 250) & (ts < 750)).float().mean()
