"""``DiffusionModule(channels_last=True)``: the net's weights and inputs change memory order, never their values."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import UNet2DModel

from medsynth.modules import DiffusionModule
from medsynth.nets import BiFlowNet3D, UNet2D

UNET = partial(UNet2D, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=8)
BIFLOW = partial(BiFlowNet3D, channels=(8, 16), norm_num_groups=4, dit_patch=4, dit_hidden=16, dit_depth=1,
                 dit_heads=2)


def pair(**kw):
    """The same module twice (same weights), the second with ``channels_last`` and its ``prepare_net`` run."""
    torch.manual_seed(0)
    plain = DiffusionModule(**kw).eval()
    torch.manual_seed(0)
    fast = DiffusionModule(channels_last=True, **kw).eval()
    fast.prepare_net()
    for p in fast.net.parameters():  # small random weights everywhere, so zero-initialised outputs say something
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    plain.net.load_state_dict(fast.net.state_dict())
    return plain, fast


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_channels_last_changes_memory_order_not_outputs(kind):
    if kind == "2d":
        plain, fast = pair(net=UNET, num_classes=3, image_size=16)
        batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1, "mask": torch.randint(0, 3, (2, 16, 16))}
        fmt, weight = torch.channels_last, fast.net.unet.conv_in.weight
    else:
        plain, fast = pair(net=BIFLOW, image_channels=2, sample_shape=[8, 8, 8])
        batch = {"image": torch.randn(2, 2, 8, 8, 8)}
        fmt, weight = torch.channels_last_3d, next(p for p in fast.net.parameters() if p.ndim == 5)
    assert weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()
    cond, _ = fast.condition(batch)
    x = fast.net_input(batch["image"], cond)
    assert x.is_contiguous(memory_format=fmt)
    assert plain.net_input(batch["image"], cond).is_contiguous()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        a, b = plain.diffusion_loss(batch, g1), fast.diffusion_loss(batch, g2)
    assert torch.isfinite(a) and a > 0
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_channels_last_state_dict_loads_into_a_plain_module_and_exports(tmp_path):
    plain, fast = pair(net=UNET, num_classes=3, image_size=16)
    fresh = DiffusionModule(net=UNET, num_classes=3, image_size=16).eval()
    fresh.load_state_dict(fast.state_dict())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(fresh.net(x, t), plain.net(x, t), atol=1e-5)
    # a channels-last net exports (safetensors) and loads in diffusers with the same outputs
    folder = fast.net.save_pretrained(tmp_path / "unet", sample_size=16)
    loaded = UNet2DModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x, t).sample, plain.net(x, t), atol=1e-5)
