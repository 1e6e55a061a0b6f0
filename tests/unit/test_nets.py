import pytest
import torch
from diffusers import UNet2DModel

from medsynth.nets import UNet2D


def tiny(**kw):
    args = dict(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=8)
    args.update(kw)
    return UNet2D(4, 1, **args)


def test_unet_maps_input_channels_to_output_channels():
    net = tiny()
    out = net(torch.randn(2, 4, 16, 16), torch.tensor([3, 700]))
    assert out.shape == (2, 1, 16, 16)


def test_attention_levels_follow_the_reference_layout():
    net = UNet2D(4, 1, block_out_channels=(8, 8, 16, 16, 32, 32),
                 attention_levels=(False, False, False, False, True, False), norm_num_groups=8)
    downs = [type(b).__name__ for b in net.unet.down_blocks]
    ups = [type(b).__name__ for b in net.unet.up_blocks]
    assert downs[4] == "AttnDownBlock2D" and downs.count("AttnDownBlock2D") == 1
    assert ups[1] == "AttnUpBlock2D" and ups.count("AttnUpBlock2D") == 1


def test_bad_net_settings_are_rejected():
    with pytest.raises(ValueError, match="attention_levels"):
        UNet2D(1, 1, block_out_channels=(8, 16), attention_levels=(True,), norm_num_groups=8)
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNet2D(1, 1, block_out_channels=(8, 12), attention_levels=(False, False), norm_num_groups=8)


def test_diffusers_export_round_trips(tmp_path):
    torch.manual_seed(0)
    net = tiny().eval()
    folder = net.save_pretrained(tmp_path / "unet", sample_size=16)
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet2DModel.from_pretrained(str(folder)).eval()
    assert loaded.config.sample_size == 16 and loaded.config.in_channels == 4
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t).sample, net(x, t), atol=1e-6)



def _bright_dot_or_not(n: int, generator: torch.Generator, side: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 1, side, side)``: grey noise with soft blobs; half of them (label 1) also hold one bright 2x2
    dot somewhere."""
    x = 0.3 * torch.randn(n, 1, side, side, generator=generator)
    label = torch.randint(0, 2, (n,), generator=generator)
    for i in range(n):
        if label[i]:
            r, c = (int(v) for v in torch.randint(0, side - 2, (2,), generator=generator))
            x[i, 0, r : r + 2, c : c + 2] = 2.0
    return x, label


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_small_classifier_max_pooling_finds_a_small_structure(spatial_dims):
    from medsynth.nets import SmallClassifier

    torch.manual_seed(0)
    net = SmallClassifier(1, 2, spatial_dims=spatial_dims, channels=(8,), pooling="max")
    shape = (3, 1, 6, 7) if spatial_dims == 2 else (3, 1, 6, 7, 5)
    assert net(torch.randn(shape)).shape == (3, 2)
    with pytest.raises(ValueError, match="pooling"):
        SmallClassifier(1, 2, pooling="sum")
    if spatial_dims == 3:
        return
    # one bright dot in 576 pixels: the strongest response anywhere tells it
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        x, y = _bright_dot_or_not(32, g)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _bright_dot_or_not(200, g)
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() > 0.9
