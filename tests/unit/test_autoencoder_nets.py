import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from medsynth.errors import MedsynthError
from medsynth.nets import KLAutoencoder, PatchVolumeAutoencoder, VectorQuantizer
from medsynth.nets.tiling import decode_tiled, encode_patchwise, reconstruct


def tiny_vq(spatial_dims, **kw):
    args = dict(spatial_dims=spatial_dims, channels=(8, 16), latent_channels=4, num_codes=32, norm_num_groups=4)
    args.update(kw)
    return PatchVolumeAutoencoder(**args)


def tiny_kl(spatial_dims, **kw):
    args = dict(spatial_dims=spatial_dims, channels=(8, 16), latent_channels=3, norm_num_groups=4)
    args.update(kw)
    return KLAutoencoder(**args)


NETS = [tiny_vq, tiny_kl]


def size_for(spatial_dims):
    return (16, 16) if spatial_dims == 2 else (8, 16, 8)


# ---------------------------------------------------------------- autoencoders


@pytest.mark.parametrize("make", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_backward_shapes_and_gradients(make, spatial_dims):
    torch.manual_seed(0)
    net = make(spatial_dims).train()
    x = torch.rand(2, 1, *size_for(spatial_dims)) * 2 - 1
    recon, reg = net(x)
    assert recon.shape == x.shape
    assert reg.ndim == 0 and torch.isfinite(reg) and reg >= 0
    (F.l1_loss(recon, x) + reg).backward()
    encoder_grads = [p.grad for p in net.encoder.parameters()]
    assert all(g is not None for g in encoder_grads)
    assert sum(float(g.abs().sum()) for g in encoder_grads) > 0
    decoder_grads = [p.grad for m in net.decoder_modules() for p in m.parameters()]
    assert all(g is not None for g in decoder_grads) and sum(float(g.abs().sum()) for g in decoder_grads) > 0


@pytest.mark.parametrize("make", NETS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encode_shape_and_eval_round_trip(make, spatial_dims):
    torch.manual_seed(0)
    net = make(spatial_dims).eval()
    x = torch.rand(2, 1, *size_for(spatial_dims)) * 2 - 1
    assert net.downsample_factor == 2 and net.spatial_dims == spatial_dims and net.in_channels == 1
    with torch.no_grad():
        z = net.encode(x)
        assert z.shape == (2, net.latent_channels, *(s // 2 for s in x.shape[2:]))
        assert torch.allclose(net.decode(z), net(x)[0], atol=1e-6)


def test_downsample_factor_follows_levels():
    net = PatchVolumeAutoencoder(spatial_dims=2, channels=(4, 4, 8, 8), latent_channels=2, num_codes=8,
                                 norm_num_groups=4)
    assert net.downsample_factor == 8
    assert net.encode(torch.zeros(1, 1, 16, 24)).shape == (1, 2, 2, 3)
    kl = KLAutoencoder(spatial_dims=2, channels=(4, 4, 8), norm_num_groups=4, latent_channels=2)
    assert kl.downsample_factor == 4 and kl.encode(torch.zeros(1, 1, 8, 12)).shape == (1, 2, 2, 3)


@pytest.mark.parametrize("make", NETS)
def test_non_multiple_input_is_rejected(make):
    net = make(3)
    with pytest.raises(MedsynthError, match=r"\(8, 9, 8\).*factor 2"):
        net(torch.zeros(1, 1, 8, 9, 8))
    with pytest.raises(MedsynthError, match="factor 2"):
        net.encode(torch.zeros(1, 1, 8, 8, 7))


def test_bad_arguments_are_rejected():
    with pytest.raises(MedsynthError, match="norm_num_groups"):
        tiny_vq(3, channels=(8, 12), norm_num_groups=8)
    with pytest.raises(MedsynthError, match="norm_num_groups"):
        tiny_kl(2, channels=(8, 12), norm_num_groups=8)
    with pytest.raises(MedsynthError, match="attention_levels"):
        tiny_kl(2, attention_levels=(True,))
    with pytest.raises(MedsynthError, match="spatial_dims"):
        tiny_vq(4)


def test_kl_forward_samples_in_training_and_uses_the_mean_in_eval():
    torch.manual_seed(0)
    net = tiny_kl(2)
    x = torch.rand(2, 1, 8, 8)
    mu, sigma = net.encode_distribution(x)
    kl = 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1).sum(dim=(1, 2, 3)).mean()
    net.eval()
    recon, reg = net(x)
    assert torch.allclose(reg, kl, rtol=1e-5)
    assert torch.allclose(net.reconstruct(x), recon) and torch.allclose(net.encode(x), mu)
    net.train()
    assert not torch.allclose(net(x)[0], recon)
    assert net.encode_stage_2_inputs(x).shape == mu.shape


def test_vq_forward_updates_the_codebook_only_in_training_and_decode_never():
    torch.manual_seed(0)
    net = tiny_vq(2)
    x = torch.rand(2, 1, 8, 8)
    before = net.quantizer.codebook.clone()
    net.eval()
    net(x)
    net.decode(net.encode(x))
    assert torch.equal(net.quantizer.codebook, before)
    net.train()
    net.decode(net.encode(x))
    assert torch.equal(net.quantizer.codebook, before)
    net(x)
    assert not torch.equal(net.quantizer.codebook, before)


# ---------------------------------------------------------------- vector quantiser


def set_codebook(vq, codes, cluster_size=1.0):
    vq.codebook.copy_(codes)
    vq.cluster_size.fill_(cluster_size)
    vq.embed_sum.copy_(codes * cluster_size)


def as_map(vectors):
    """(N, D) vectors -> a (1, D, N) one-dimensional feature map."""
    return vectors.t()[None].clone()


def test_quantisation_picks_the_nearest_code_with_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=3).eval()
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, loss, indices = vq(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    expected = torch.cdist(flat, vq.codebook).argmin(1)
    assert indices.shape == (2, 4, 5) and indices.dtype == torch.long
    assert torch.equal(indices.reshape(-1), expected)
    assert torch.allclose(z_q.detach(), vq.codebook[indices].movedim(-1, 1))
    assert torch.allclose(loss, 0.25 * F.mse_loss(z.detach(), z_q.detach()))
    (z_q * 3).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))
    assert 1.0 <= float(vq.last_perplexity) <= 16.0


def test_ema_update_matches_the_hand_computed_value():
    vq = VectorQuantizer(num_codes=2, code_dim=2, decay=0.5, dead_code_threshold=0.0).train()
    set_codebook(vq, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [9.0, 9.0], [11.0, 10.0]])
    _, _, indices = vq(as_map(vectors))
    assert indices.tolist() == [[0, 0, 1, 1]]
    # cluster sizes 0.5 * 1 + 0.5 * 2 = 1.5 (equal, so Laplace smoothing leaves them unchanged);
    # sums 0.5 * old_code + 0.5 * (sum of assigned vectors).
    assert torch.allclose(vq.cluster_size, torch.tensor([1.5, 1.5]))
    expected = torch.tensor([[0.5 / 1.5, 1.0 / 1.5], [15.0 / 1.5, 14.5 / 1.5]])
    assert torch.allclose(vq.codebook, expected, atol=1e-5)
    assert float(vq.last_perplexity) == pytest.approx(2.0) and vq.last_restarted == 0


def test_ema_update_uses_laplace_smoothed_cluster_sizes():
    vq = VectorQuantizer(num_codes=2, code_dim=1, decay=0.5, dead_code_threshold=0.0, eps=0.1).train()
    set_codebook(vq, torch.tensor([[0.0], [10.0]]))
    vq(as_map(torch.tensor([[1.0], [2.0], [3.0]])))  # all three go to code 0
    size = torch.tensor([0.5 + 1.5, 0.5])
    sums = torch.tensor([0.0 + 3.0, 5.0])
    smoothed = (size + 0.1) / (size.sum() + 0.2) * size.sum()
    assert torch.allclose(vq.codebook[:, 0], sums / smoothed)


def test_dead_code_is_restarted_to_a_batch_vector():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=3, code_dim=2, decay=0.99, dead_code_threshold=1.0).train()
    set_codebook(vq, torch.tensor([[0.0, 0.0], [5.0, 5.0], [1000.0, 1000.0]]))
    vectors = torch.tensor([[0.1, 0.2], [-0.3, 0.1], [5.2, 4.9], [4.8, 5.1], [0.0, -0.2]])
    vq(as_map(vectors))
    assert vq.last_restarted == 1
    new_code = vq.codebook[2]
    assert (vectors == new_code).all(1).any()
    assert float(vq.cluster_size[2]) == 1.0 and torch.equal(vq.embed_sum[2], new_code)
    assert vq.codebook[:2].abs().max() < 10  # the used codes stay near their clusters


def test_no_update_and_no_restart_in_eval_mode():
    vq = VectorQuantizer(num_codes=3, code_dim=2).eval()
    set_codebook(vq, torch.tensor([[0.0, 0.0], [5.0, 5.0], [1000.0, 1000.0]]))
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 2, 4, 4))
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())
    assert vq.last_restarted == 0


def test_update_runs_under_a_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        vq = VectorQuantizer(num_codes=3, code_dim=2).train()
        set_codebook(vq, torch.tensor([[0.0, 0.0], [5.0, 5.0], [1000.0, 1000.0]]))
        vectors = torch.tensor([[0.1, 0.2], [5.2, 4.9], [4.8, 5.1]])
        vq(as_map(vectors))
        assert vq.last_restarted == 1 and (vectors == vq.codebook[2]).all(1).any()
    finally:
        dist.destroy_process_group()


def _rank_update(rank: int, store_path: str, out_path: str) -> None:
    """One of two DDP ranks: EMA-update a codebook on its half of the vectors, save the result."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        vq = VectorQuantizer(num_codes=2, code_dim=2, decay=0.5, dead_code_threshold=0.0).train()
        set_codebook(vq, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        halves = [torch.tensor([[1.0, 0.0], [9.0, 9.0]]), torch.tensor([[0.0, 2.0], [11.0, 10.0]])]
        vq(as_map(halves[rank]))
        torch.save({"codebook": vq.codebook.clone(), "cluster_size": vq.cluster_size.clone()}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_codebook_statistics_are_all_reduced_across_ranks(tmp_path):
    """Two ranks, each with half the batch, end with the same codebook as one process with all of it."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_update, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    single = VectorQuantizer(num_codes=2, code_dim=2, decay=0.5, dead_code_threshold=0.0).train()
    set_codebook(single, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    single(as_map(torch.tensor([[1.0, 0.0], [9.0, 9.0], [0.0, 2.0], [11.0, 10.0]])))
    for r in ranks:
        assert torch.allclose(r["codebook"], single.codebook, atol=1e-6)
        assert torch.allclose(r["cluster_size"], single.cluster_size)


# ---------------------------------------------------------------- tiling


class PoolNet(torch.nn.Module):
    """An exactly known linear autoencoder: average pooling down, nearest upsampling and a channel mix up."""

    def __init__(self, factor):
        super().__init__()
        self.downsample_factor = factor
        self.mix = torch.tensor([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0]])  # (C_out=3, L=2)

    def encode(self, x):
        pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        z = pool(x, self.downsample_factor)  # (B, 1, *spatial / f)
        return torch.cat([z, z**2], 1)  # (B, 2, *spatial / f)

    def decode(self, z):
        x = F.interpolate(z, scale_factor=self.downsample_factor, mode="nearest")
        return torch.einsum("ol,bl...->bo...", self.mix, x)


@pytest.mark.parametrize(("shape", "patch"), [((16, 24), (8, 4)), ((8, 16, 24), (8, 4, 12))])
def test_patchwise_encoding_equals_whole_encoding_for_aligned_sizes(shape, patch):
    net = PoolNet(4)
    x = torch.randn(2, 1, *shape)
    z = encode_patchwise(net.encode, x, patch, 4, batch=3)
    assert torch.allclose(z, net.encode(x), atol=1e-6)


def test_patchwise_encoding_pads_with_background():
    net = PoolNet(2)
    x = torch.randn(1, 1, 10, 7)
    z = encode_patchwise(net.encode, x, (4, 4), 2)
    padded = F.pad(x, (0, 1, 0, 2), value=-1.0)  # to (12, 8)
    assert z.shape == (1, 2, 6, 4)
    assert torch.allclose(z, net.encode(padded), atol=1e-6)
    with pytest.raises(MedsynthError, match="multiple of the downsample factor"):
        encode_patchwise(net.encode, x, 5, 2)


@pytest.mark.parametrize(("shape", "tile"), [((13, 9), (4, 3)), ((7, 10, 5), (4, 3, 2))])
@pytest.mark.parametrize("batch", [1, 4])
def test_tiled_decoding_equals_whole_decoding(shape, tile, batch):
    net = PoolNet(2)
    z = torch.randn(2, 2, *shape)
    calls = []

    def decode(tile):
        calls.append(tile.shape)
        return net.decode(tile)

    out = decode_tiled(decode, z, tile, 2, overlap=0.25, batch=batch)
    assert len(calls) > 1 and all(c[2:] == tile for c in calls)
    assert out.dtype == torch.float32
    assert torch.allclose(out, net.decode(z), atol=1e-5)


def test_tiled_decoding_of_a_latent_within_one_tile_is_one_call():
    net = PoolNet(2)
    z = torch.randn(1, 2, 3, 4)
    calls = []
    out = decode_tiled(lambda t: calls.append(1) or net.decode(t), z, (3, 8), 2)
    assert calls == [1] and torch.allclose(out, net.decode(z))


@pytest.mark.parametrize("decode_tile", [None, 3])
def test_reconstruct_crops_back_to_the_input_shape(decode_tile):
    net = PoolNet(2)
    x = torch.randn(1, 1, 11, 6, 9)
    out = reconstruct(net, x, patch_size=4, decode_tile=decode_tile)
    assert out.shape == (1, 3, 11, 6, 9)
    # a constant image reconstructs to the channel mix of its value wherever the padding does not reach
    const = torch.full((1, 1, 11, 6, 9), 0.5)
    expected = net.mix @ torch.tensor([0.5, 0.25])
    out = reconstruct(net, const, patch_size=4, decode_tile=decode_tile)
    assert torch.allclose(out[0, :, :10, :, :8], expected[:, None, None, None].expand(3, 10, 6, 8), atol=1e-5)


def test_reconstruct_a_volume_larger_than_the_patch_with_a_real_net():
    torch.manual_seed(0)
    net = tiny_vq(3).eval()
    x = torch.rand(1, 1, 20, 12, 10) * 2 - 1
    with torch.no_grad():
        out = reconstruct(net, x, patch_size=8, decode_tile=4, overlap=0.5, batch=2)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_3d_patch_volume_autoencoder_at_8x_compression():
    """The 8x variant of 3D MedDiffusion (four levels) encodes and decodes volumes, gradients reaching the input."""
    net = PatchVolumeAutoencoder(spatial_dims=3, channels=(4, 4, 8, 8), latent_channels=2, num_codes=16,
                                 norm_num_groups=4)
    assert net.downsample_factor == 8
    x = (torch.rand(1, 1, 16, 16, 24) * 2 - 1).requires_grad_()
    z = net.encode(x)
    assert z.shape == (1, 2, 2, 2, 3)
    recon, reg = net(x)
    assert recon.shape == x.shape
    (recon.abs().mean() + reg).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
