"""Progress over denoising steps and decoding tiles (issue #16): shown in predict when asked, silent in previews."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from medsynth.diffusion import DDIMSampler
from medsynth.modules import DiffusionModule
from medsynth.nets.tiling import decode_tiled


class ZeroNet(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, xt, t):
        return torch.zeros_like(xt)


class UpsamplingCodec(nn.Module):
    """Stands in for a frozen autoencoder: decodes by nearest upsampling (factor 2)."""

    def __init__(self):
        super().__init__()
        self.net = SimpleNamespace(decode=lambda z: F.interpolate(z, scale_factor=2.0), downsample_factor=2,
                                   latent_channels=1)
        self.image_size = 8
        self.hparams = SimpleNamespace(predict_overlap=0.25)


def latent_model(progress):
    m = DiffusionModule(net=ZeroNet, sampler=DDIMSampler(4, progress=progress), sample_shape=[8, 8, 8],
                        latent_space={"shift": 0.0, "scale": 1.0, "method": "std"}, decode_tile=4).eval()
    m.latent_codec._module = UpsamplingCodec()
    return m


BATCH = {"index": torch.tensor([0, 1]), "name": ["a", "b"]}


def test_forced_progress_shows_denoising_steps_and_decoding_tiles_in_predict(capfd):
    out = latent_model(progress=True).predict_step(BATCH, 0)
    err = capfd.readouterr().err
    assert out["sample"].shape == (2, 1, 16, 16, 16)
    assert "denoising (DDIMSampler)" in err and "4/4" in err
    assert "decoding tiles" in err and "54/54" in err  # 3x3x3 tiles of 4 (starts 0, 3, 4) per volume, 2 volumes


def test_previews_during_fit_and_unforced_progress_stay_silent(capfd):
    m = latent_model(progress=True)
    m._trainer = SimpleNamespace(predicting=False)  # a trainer that fits or validates: previews
    m.decode(m.sample(indices=[0]))
    assert capfd.readouterr().err == ""
    for flag in (None, False):  # None: only on a terminal, and pytest's stderr is not one
        latent_model(progress=flag).predict_step(BATCH, 0)
        assert capfd.readouterr().err == ""


def test_tiled_decoding_blends_tiles_with_a_gaussian_of_the_output_tile():
    """MONAI places the tiles; the blend is the weighted mean under the output-resolution Gaussian, checked against
    a direct computation for a decoder with context (a convolution), where the weights matter."""
    from medsynth.nets.tiling import _gaussian_weights

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 1, 3, padding=1)

    def decode(z):
        return conv(F.interpolate(z, scale_factor=2.0))

    z = torch.randn(2, 2, 10, 7)
    with torch.no_grad():
        out = decode_tiled(decode, z, (4, 4), 2, overlap=0.25, batch=3)
        num, den = torch.zeros(2, 1, 20, 14), torch.zeros(20, 14)
        w = _gaussian_weights((8, 8), z.device)
        for i in (0, 3, 6):  # MONAI's starts: stride int(4 * 0.75) = 3, the last flush with the end
            for j in (0, 3):
                num[..., 2 * i:2 * i + 8, 2 * j:2 * j + 8] += decode(z[..., i:i + 4, j:j + 4]) * w
                den[2 * i:2 * i + 8, 2 * j:2 * j + 8] += w
        assert torch.allclose(out, num / den, atol=1e-6)
        assert not torch.allclose(out, decode(z), atol=1e-3)  # seams exist: the blend is what is compared
