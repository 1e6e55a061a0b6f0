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
