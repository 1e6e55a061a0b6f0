"""The perceptual-loss export recipe keeps the network's input normalisation (issue #16)."""

import pytest
import torch
from monai.losses.perceptual import medicalnet_intensity_normalisation, subtract_mean
from torch import nn

from medsynth.losses.perceptual import FeatureExtractor, PerceptualLoss


class TinyFeatures(nn.Module):
    def __init__(self, channels=1, dims=3):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.a = conv(channels, 4, 3, padding=1)
        self.b = conv(4, 4, 3, padding=1)

    def forward(self, x):
        f1 = torch.relu(self.a(x))
        return [f1, self.b(f1)]


def traced(module, example, path):
    torch.jit.trace(module.eval(), example).save(str(path))
    return path


def test_a_traced_medicalnet_extractor_applies_the_z_score(tmp_path):
    torch.manual_seed(0)
    model = TinyFeatures()
    example = torch.zeros(1, 1, 8, 8, 8)
    kept = PerceptualLoss(traced(FeatureExtractor(model, "medicalnet"), example, tmp_path / "kept.pt"), mode="3d")
    bare = PerceptualLoss(traced(model, example, tmp_path / "bare.pt"), mode="3d")  # the old recipe: .model only
    x, y = torch.rand(2, 1, 8, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8, 8) * 2 - 1
    # MedicalNet sees z-scored inputs: an affine change of intensities does not change what it sees
    assert torch.allclose(kept(x, y), kept(3 * x + 1, 3 * y + 1), atol=1e-5)
    assert not torch.allclose(bare(x, y), bare(3 * x + 1, 3 * y + 1), atol=1e-3)
    # and exactly MONAI's normalisation, inside the saved file
    out = torch.jit.load(str(tmp_path / "kept.pt"))(x)
    assert torch.allclose(out[1], model(medicalnet_intensity_normalisation(x))[1], atol=1e-5)


def test_a_traced_radimagenet_extractor_matches_monais_preprocessing(tmp_path):
    torch.manual_seed(0)
    model = TinyFeatures(channels=3, dims=2)
    path = traced(FeatureExtractor(model, "radimagenet"), torch.zeros(1, 3, 8, 8), tmp_path / "rad.pt")
    x = torch.rand(2, 3, 8, 8) * 2 - 1  # medsynth's range; RadImageNet was trained on [0, 1]
    expected = model(subtract_mean(((x + 1) / 2)[:, [2, 1, 0]].clone()))
    assert torch.allclose(torch.jit.load(str(path))(x)[1], expected[1], atol=1e-5)
    loss = PerceptualLoss(path, repeat_channels=3)
    gray = torch.rand(2, 1, 8, 8) * 2 - 1
    assert loss(gray, gray) == 0 and loss(gray, -gray) > 0


def test_unknown_normalisation_is_refused():
    from medsynth.errors import MedsynthError

    with pytest.raises(MedsynthError, match="normalisation='imagenet'"):
        FeatureExtractor(nn.Identity(), "imagenet")
