import pytest
import torch
from torch import nn

from medsynth.errors import MedsynthError
from medsynth.nets import BiFlowNet3D
from medsynth.nets.biflownet import sincos_grid_embedding, sinusoidal_embedding

TINY = dict(
    channels=(8, 16), norm_num_groups=4, mid_attention_heads=2,
    dit_hidden=16, dit_depth=1, dit_heads=2, dit_patch=4, dit_token_patch=2,
)
SIZES = [(8, 8, 8), (8, 16, 8)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and busy-waiting threads crawl when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw):
    torch.manual_seed(0)
    return BiFlowNet3D(3, 2, **{**TINY, **kw})


def wake(net, which=("conv_out", "linear", "modulation")):
    """Give the zero-initialised layers random weights, as if the net had trained for a while."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if any(w in name for w in which):
                p.normal_(0, 0.1)
    return net


def loss_of(net, shape, labels=None):
    x = torch.randn(2, 3, *shape)
    t = torch.tensor([10, 900])
    out = net(x, t) if labels is None else net(x, t, class_labels=labels)
    assert out.shape == (2, 2, *shape) and torch.isfinite(out).all()
    return out.square().mean()


@pytest.mark.parametrize("num_class_embeds", [None, 3])
def test_one_net_trains_on_two_sizes_through_both_branches(num_class_embeds):
    net = wake(tiny(num_class_embeds=num_class_embeds))
    labels = torch.tensor([0, 2]) if num_class_embeds else None
    loss = sum(loss_of(net, shape, labels) for shape in SIZES)
    loss.backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent, f"no gradient reaches {silent}"
    dit, unet = net.dit_blocks[0].qkv.weight, net.down_levels[0][0].conv1.weight
    before = dit.clone(), unet.clone()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.equal(before[0], dit) and not torch.equal(before[1], unet)


def test_training_from_the_zero_init_reaches_every_parameter():
    # Zero output conv, zero fusion maps and adaLN-Zero form a chain: each SGD step wakes the next link, so by the
    # fourth step every parameter has had a gradient (the deepest DiT weights' are tiny at first, as in DiT).
    net = tiny()
    x, t, target = torch.randn(1, 3, 8, 8, 8), torch.tensor([500]), torch.randn(1, 2, 8, 8, 8)
    assert not net(x, t).any()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    reached = set()
    for step in range(4):
        opt.zero_grad()
        (net(x, t) - target).square().mean().backward()
        if step == 0:
            assert net.conv_out.weight.grad.any() and not net.conv_in.weight.grad.any()
        reached |= {n for n, p in net.named_parameters() if p.grad is not None and p.grad.any()}
        opt.step()
    assert reached == {n for n, _ in net.named_parameters()}


def test_dit_branch_is_local_to_tokens_and_sub_volumes():
    net = wake(tiny(), which=("linear",))  # adaLN still zero: each token passes the block unchanged
    x = torch.randn(1, 3, 8, 16, 8)
    emb = net.embed_conditions(torch.tensor([5]), None, x.shape[2:], 1)
    y = x.clone()
    y[0, :, 1, 6, 2] += 1.0  # voxel in token cube [0:2, 6:8, 2:4], sub-volume [0:4, 4:8, 0:4]
    with torch.no_grad():
        a, b = net.intra_patch_features(x, emb), net.intra_patch_features(y, emb)
        changed = (a["early"] - b["early"]).abs().sum(1)[0] > 0  # (D, H, W)
        expected = torch.zeros_like(changed)
        expected[0:2, 6:8, 2:4] = True
        assert torch.equal(changed, expected)

        wake(net, which=("modulation",))  # tokens now attend within their sub-volume only
        a, b = net.intra_patch_features(x, emb), net.intra_patch_features(y, emb)
        assert a["late"].shape == (1, net.channels[0], 8, 16, 8)
        changed = (a["late"] - b["late"]).abs().sum(1)[0] > 0
        expected = torch.zeros_like(changed)
        expected[0:4, 4:8, 0:4] = True
        assert torch.equal(changed, expected)


def test_token_positions_are_frozen_sincos():
    net = tiny()
    assert "token_pos" not in dict(net.named_parameters()) and "token_pos" not in net.state_dict()
    assert torch.equal(net.token_pos[0], sincos_grid_embedding((2, 2, 2), 16))
    assert net.token_pos[0].unique(dim=0).shape[0] == 8  # every token position differs


def test_class_labels_change_the_output():
    net = wake(tiny(num_class_embeds=3), which=("conv_out",))
    x, t = torch.randn(1, 3, 8, 8, 8), torch.tensor([100])
    with torch.no_grad():
        assert not torch.allclose(net(x, t, class_labels=torch.tensor([0])), net(x, t, class_labels=torch.tensor([2])))


def test_resolution_conditioning_tells_sizes_apart():
    assert not torch.allclose(sinusoidal_embedding(torch.tensor([8.0]), 8), sinusoidal_embedding(torch.tensor([16.0]), 8))
    t = torch.tensor([7])
    with torch.no_grad():
        net = tiny()
        assert not torch.allclose(net.embed_conditions(t, None, (8, 8, 8), 1), net.embed_conditions(t, None, (8, 16, 8), 1))
        off = tiny(resolution_conditioning=False)
        assert torch.equal(off.embed_conditions(t, None, (8, 8, 8), 1), off.embed_conditions(t, None, (8, 16, 8), 1))


def test_without_dit_it_is_a_plain_unet():
    net = wake(tiny(dit_fusion=()), which=("conv_out",))
    assert not hasattr(net, "dit_blocks") and net.size_multiple == 2
    assert net(torch.randn(1, 3, 6, 6, 6), torch.tensor([1])).shape == (1, 2, 6, 6, 6)


def test_bad_inputs_and_settings_are_rejected():
    net = tiny()
    with pytest.raises(MedsynthError, match=r"\(8, 6, 8\).*multiple of 4"):
        net(torch.randn(1, 3, 8, 6, 8), torch.tensor([1]))
    with pytest.raises(MedsynthError, match="num_class_embeds=None"):
        net(torch.randn(1, 3, 8, 8, 8), torch.tensor([1]), class_labels=torch.tensor([0]))
    with pytest.raises(MedsynthError, match="no class_labels"):
        tiny(num_class_embeds=2)(torch.randn(1, 3, 8, 8, 8), torch.tensor([1]))
    with pytest.raises(MedsynthError, match="norm_num_groups"):
        tiny(channels=(8, 10))
    with pytest.raises(MedsynthError, match="dit_token_patch"):
        tiny(dit_token_patch=3)
    with pytest.raises(MedsynthError, match="dit_fusion"):
        tiny(dit_fusion=("middle",))
    assert isinstance(tiny(), nn.Module)
