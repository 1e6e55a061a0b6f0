"""Adversarial and perceptual losses, and reconstruction metrics, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medsynth.errors import MedsynthError
from medsynth.losses import AdversarialLoss, PerceptualLoss
from medsynth.metrics import ms_ssim, psnr, ssim


def test_psnr_of_a_known_error_level():
    x = torch.zeros(2, 1, 8, 8)
    y = x + 0.1  # MSE 0.01 with peak-to-peak range 2: 10 log10(4 / 0.01)
    assert psnr(y, x) == pytest.approx(torch.full((2,), 10 * math.log10(400.0)), abs=1e-4)


def test_ssim_and_ms_ssim_are_one_for_identical_images_and_fall_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(noisy, x) < 0.8).all() and (ms_ssim(noisy, x) < 0.9).all()
    vol = torch.rand(1, 1, 12, 12, 12, generator=g)
    assert ssim(vol, vol).item() == pytest.approx(1.0, abs=1e-5)  # 3D, window shrunk to fit


def test_hinge_losses_by_hand():
    # MONAI's hinge squashes logits with tanh first: real term mean(relu(1 - tanh(r))), fake mean(relu(1 + tanh(f)))
    adv = AdversarialLoss("hinge")
    r, f = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.5]])
    t = math.tanh
    real_term = ((1 - t(2.0)) + (1 - t(0.5))) / 2
    fake_term = ((1 + t(-2.0)) + (1 + t(0.5))) / 2
    assert adv.discriminator([r], [f]).item() == pytest.approx(0.5 * (real_term + fake_term), abs=1e-6)
    # generator: the fake logits judged as real
    assert adv.generator([f]).item() == pytest.approx(((1 - t(-2.0)) + (1 - t(0.5))) / 2, abs=1e-6)


def test_least_squares_losses_by_hand():
    adv = AdversarialLoss("least_squares")
    zeros, ones = [torch.zeros(1, 4)], [torch.ones(1, 4)]
    # leaky-relu activation leaves 0 and 1 unchanged: real target 1, fake target 0
    assert adv.discriminator(ones, zeros).item() == pytest.approx(0.0)
    assert adv.discriminator(zeros, ones).item() == pytest.approx(1.0)
    assert adv.generator(zeros).item() == pytest.approx(1.0)


def test_feature_matching_ignores_the_logits_and_compares_features():
    feats_r = [torch.ones(1, 2, 4), torch.zeros(1, 1, 2)]
    feats_f = [torch.full((1, 2, 4), 3.0), torch.full((1, 1, 2), 9.0)]
    assert AdversarialLoss.feature_matching(feats_r, feats_f).item() == pytest.approx(2.0)


class TwoFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = torch.relu(self.a(x))
        return [f1, self.b(f1)]


def test_perceptual_loss_loads_local_torchscript_and_is_zero_for_identical_inputs(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "features.pt"
    torch.jit.script(TwoFeatures()).save(str(path))
    loss = PerceptualLoss(weights=path)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = x.clone().requires_grad_(True)
    value = loss(y.flip(-1), x)
    value.backward()
    assert value.item() > 0 and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.net.parameters())  # frozen
    vol = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    loss25 = PerceptualLoss(weights=path, mode="2.5d", num_slices=2)
    assert loss25(vol, vol).item() == pytest.approx(0.0, abs=1e-6) and loss25(vol, -vol).item() > 0


def test_perceptual_loss_without_local_weights_says_what_is_missing(tmp_path):
    with pytest.raises(MedsynthError, match="never downloaded"):
        PerceptualLoss(weights=tmp_path / "missing.pt")
    with pytest.raises(MedsynthError, match="local weights"):
        PerceptualLoss()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(MedsynthError, match="not a TorchScript"):
        PerceptualLoss(weights=bad)


# ---------------------------------------------------------------------------------------------------- realism, diversity
from medsynth.metrics import FeatureNet, frechet_distance, kernel_inception_distance, mean_pairwise_similarity  # noqa: E402


def test_frechet_distance_by_hand():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    # equal covariances, shifted mean: the distance is the squared shift
    assert frechet_distance(real, real + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)) == pytest.approx(5.0, rel=1e-6)
    # zero means, covariances I and 4I in 3 dims: tr(I + 4I - 2 * 2I) = 3
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(20000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=0.15)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and shifted > 10 * max(abs(same), 1e-3)


def test_diversity_is_one_for_copies_and_low_for_noise():
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    assert mean_pairwise_similarity(x.repeat(5, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert mean_pairwise_similarity(noise) < 0.2
    vols = torch.rand(3, 1, 12, 12, 12) * 2 - 1
    assert mean_pairwise_similarity(vols) < 0.5  # volumes: SSIM


def test_feature_net_needs_local_weights_and_feeds_uint8(tmp_path):
    with pytest.raises(MedsynthError, match="never downloaded"):
        FeatureNet(tmp_path / "inception.pt")
    with pytest.raises(MedsynthError, match="local feature network"):
        FeatureNet()

    class MeanRGB(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
            return x.float().mean((2, 3))

    path = tmp_path / "f.pt"
    torch.jit.script(MeanRGB()).save(str(path))
    net = FeatureNet(path, input_size=32)
    feats = net(torch.full((2, 1, 16, 16), 1.0))
    assert feats.shape == (2, 3) and torch.allclose(feats, torch.full((2, 3), 255.0, dtype=torch.float64))


def test_sample_report_refuses_to_score_a_folder_on_several_ranks(tmp_path):
    from types import SimpleNamespace

    from medsynth.callbacks import SampleReport

    report = SampleReport()
    trainer = SimpleNamespace(world_size=2, datamodule=SimpleNamespace(samples_dir=tmp_path))
    with pytest.raises(MedsynthError, match="--trainer.devices 1"):
        report.on_test_start(trainer, None)
    report.on_test_start(SimpleNamespace(world_size=2, datamodule=SimpleNamespace()), None)  # real data: fine
    report.on_test_start(SimpleNamespace(world_size=1, datamodule=SimpleNamespace(samples_dir=tmp_path)), None)
