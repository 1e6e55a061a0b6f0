"""3D MedDiffusion's original networks as options of BiFlowNet3D and PatchVolumeAutoencoder, built from the recipes."""

from pathlib import Path

import pytest
import torch
import yaml

from medsynth.diffusion import DDPMObjective
from medsynth.errors import MedsynthError
from medsynth.nets import BiFlowNet3D, PatchVolumeAutoencoder
from tests.unit.test_biflownet import one_thread  # noqa: F401  (tiny tensors run on one thread)

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "configs" / "experiments"


def recipe(name: str) -> dict:
    return yaml.safe_load((EXPERIMENTS / name).read_text())["model"]["init_args"]


def count(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def test_biflownet_recipe_has_the_originals_parameter_count():
    args = recipe("biflownet3d_meddiffusion.yaml")["net"]["init_args"]
    with torch.device("meta"):
        net = BiFlowNet3D(8, 8, num_class_embeds=7, **args)  # the original's 7 classes, no null label
    assert count(net) == 157_618_016
    # the original also stores its frozen 8x8x8 x 72 position table as a parameter; here it is a computed buffer
    assert count(net) + net.token_pos.numel() == 157_654_880
    assert net.emb_dim == 576 and net.size_multiple == 8


@pytest.mark.parametrize(
    "name, total, encoder, decoder",
    [("ae3d_meddiffusion_4x.yaml", 8_485_641, 3_928_184, 4_557_313), ("ae3d_meddiffusion_8x.yaml", 34_818_921, None, None)],
)
def test_patch_volume_recipes_have_the_originals_parameter_counts(name, total, encoder, decoder):
    args = recipe(name)["net"]["init_args"]
    with torch.device("meta"):
        net = PatchVolumeAutoencoder(**args)
    assert count(net) == total
    assert count(net.pre_quant_conv) + count(net.post_quant_conv) == 144
    if encoder is not None:
        assert (count(net.encoder), count(net.decoder)) == (encoder, decoder)
    assert net.downsample_factor == int(name.split("_")[-1][0])


TINY_ORIGINAL = dict(
    variant="meddiffusion", channels=(8, 8, 16), num_res_blocks=2, norm_num_groups=4, mid_attention_heads=2,
    attention_head_dim=4, attention_levels=(2,), full_resolution_levels=2, dit_patch=4, dit_token_patch=1,
    dit_hidden=8, dit_depth=1, dit_heads=2,
)


def tiny_original(**kw):
    torch.manual_seed(0)
    net = BiFlowNet3D(3, 3, **{**TINY_ORIGINAL, **kw})
    with torch.no_grad():  # wake the zero-initialised DiT outputs, as after some training
        for name, p in net.named_parameters():
            if "modulation" in name or "final" in name:
                p.normal_(0, 0.1)
    return net


def test_original_biflownet_trains_on_two_sizes_with_four_fusion_points():
    net = tiny_original(num_class_embeds=3)
    labels = torch.tensor([0, 2])
    loss = 0
    for shape in [(8, 8, 8), (4, 8, 12)]:
        x = torch.randn(2, 3, *shape)
        emb = net.embed_conditions(torch.tensor([3, 700]), labels, shape, 2)
        assert emb.shape == (2, 8 * 8)  # time + class, concatenated with the resolution embedding
        fusion = net.intra_patch_features(x, emb)
        assert sorted(fusion) == ["early", "early1", "late", "late1"]
        assert all(f.shape == (2, 8, *shape) for f in fusion.values())
        out = net(x, torch.tensor([3, 700]), class_labels=labels)
        assert out.shape == (2, 3, *shape) and torch.isfinite(out).all()
        loss = loss + out.square().mean()
    loss.backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent, f"no gradient reaches {silent}"


def test_original_resolution_embedding_is_the_latent_size_over_64():
    net = tiny_original()
    t = torch.tensor([5])
    with torch.no_grad():
        a, b = net.embed_conditions(t, None, (8, 8, 8), 1), net.embed_conditions(t, None, (8, 16, 8), 1)
        assert torch.equal(a[:, :32], b[:, :32])  # the time half is shared
        assert torch.allclose(a[:, 32:], net.resolution_mlp(torch.tensor([[8.0, 8.0, 8.0]]) / 64))


def test_original_dit_output_blocks_use_long_skips():
    net = tiny_original()
    assert all(b.skip_linear is not None for b in net.dit_output_blocks)
    assert all(b.skip_linear is None for b in [*net.dit_input_blocks, *net.dit_blocks])
    assert len(net.dit_input_final) == len(net.dit_output_final) == 2


def test_original_variant_settings_are_checked():
    with pytest.raises(MedsynthError, match="dit_fusion"):
        BiFlowNet3D(3, 3, **{**TINY_ORIGINAL, "dit_fusion": ("early",)})
    with pytest.raises(MedsynthError, match="full_resolution_levels"):
        BiFlowNet3D(3, 3, **{**TINY_ORIGINAL, "channels": (8, 16, 16)})
    with pytest.raises(MedsynthError, match="variant=meddiffusion"):
        BiFlowNet3D(3, 3, channels=(8, 16), norm_num_groups=4, attention_levels=(1,))
    with pytest.raises(MedsynthError, match="variant"):
        BiFlowNet3D(3, 3, channels=(8, 16), norm_num_groups=4, variant="other")


def test_original_patch_volume_options_round_trip_in_eval():
    torch.manual_seed(0)
    net = PatchVolumeAutoencoder(
        channels=(8, 16, 16), num_res_blocks=2, latent_channels=4, num_codes=16, norm_num_groups=4, norm_eps=1e-6,
        mid_attention_heads=2, attention_head_dim=4, quant_convs=True, downsample_kernel=4, upsample="transposed",
        encoder_out_kernel=3,
    ).eval()
    x = torch.randn(1, 1, 8, 16, 8)
    z = net.encode(x)
    assert z.shape == (1, 4, 2, 4, 2)
    with torch.no_grad():
        recon, loss = net(x)
        assert torch.equal(net.decode(z), recon) and recon.shape == x.shape
    assert net.post_quant_conv in net.decoder_modules()
    with pytest.raises(MedsynthError, match="upsample"):
        PatchVolumeAutoencoder(channels=(8, 16), norm_num_groups=4, upsample="bilinear")


def test_l1_objective_option_is_the_absolute_error():
    pred, target = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.equal(DDPMObjective(loss="l1").error(pred, target), torch.tensor([[1.0, 3.0]]))
    assert torch.equal(DDPMObjective().error(pred, target), torch.tensor([[1.0, 9.0]]))
    with pytest.raises(MedsynthError, match="loss"):
        DDPMObjective(loss="huber")


def test_diffusion_module_trains_with_the_l1_error():
    from functools import partial

    from medsynth.modules import DiffusionModule
    from medsynth.nets import UNet2D

    net = partial(UNet2D, block_out_channels=(8, 16), attention_levels=(False, False), norm_num_groups=8)
    batch = {"image": torch.rand(2, 1, 8, 8) * 2 - 1}
    losses = {}
    for loss in ("l1", "mse"):
        torch.manual_seed(0)
        m = DiffusionModule(net=net, image_size=8, objective=DDPMObjective(loss=loss)).eval()
        with torch.no_grad():
            got = m.diffusion_loss(batch, torch.Generator().manual_seed(3))
            g = torch.Generator().manual_seed(3)  # the same noise and timesteps, as diffusion_loss draws them
            noise = torch.randn(batch["image"].shape, generator=g)
            t = m.objective.sample_timesteps(2, g)
            pred = m.denoise(m.objective.add_noise(batch["image"], noise, t), t, None)
        losses[loss] = (got, (pred - noise).abs().mean() if loss == "l1" else (pred - noise).square().mean())
    for got, expected in losses.values():
        assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(losses["l1"][0], losses["mse"][0])


def test_cosine_schedule_with_the_originals_beta_cap():
    # 3D MedDiffusion's cosine_beta_schedule: abar from cos(((t / T) + s) / (1 + s) * pi / 2) ** 2, betas capped at 0.9999
    steps, s = 1000, 0.008
    x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
    abar = torch.cos(((x / steps) + s) / (1 + s) * torch.pi * 0.5) ** 2
    betas = (1 - abar[1:] / abar[:-1]).clip(0, 0.9999)
    expected = torch.cumprod(1 - betas, 0).float()
    ours = DDPMObjective(beta_schedule="squaredcos_cap_v2", max_beta=0.9999).alphas_cumprod
    assert torch.allclose(ours, expected, rtol=1e-3, atol=1e-6)
    assert ours[-1] == pytest.approx(float(expected[-1]), rel=1e-3)  # the cap shows at the last step only
    default = DDPMObjective(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.equal(default[:-1], ours[:-1]) and default[-1] > 5 * ours[-1]


def test_the_biflownet_recipe_trains_with_the_originals_settings(tmp_path):
    """The recipe's training settings (Adam without decay, constant lr, L1 on epsilon with the 0.9999 beta cap, the
    EMA schedule) reach the run; the net is shrunk by overrides to keep this quick."""
    from medsynth.cli import main
    from tests.unit.test_latents import write_latents

    manifest = write_latents(tmp_path / "latents", {"a": (8, 8, 8), "b": (8, 8, 8)}, channels=4,
                             labels={"a": 0, "b": 1}, class_names=["x", "y"])
    run = tmp_path / "run"
    main(["fit", "--config", str(ROOT / "configs/biflownet3d.yaml"), "--config", str(EXPERIMENTS / "biflownet3d_meddiffusion.yaml"),
          "--model.net.init_args.channels", "[24, 24, 48]", "--model.net.init_args.dit_hidden", "24",
          "--model.net.init_args.attention_levels", "[2]", "--data.manifest", str(manifest), "--data.batch_size", "2",
          "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(run)])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["objective"]["init_args"]["loss"] == "l1" and hp["objective"]["init_args"]["max_beta"] == 0.9999
    assert hp["optimizer"]["class_path"] == "torch.optim.Adam" and hp["lr_schedule"] == "constant"
    assert hp["net"]["init_args"]["variant"] == "meddiffusion"
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.0
    assert any("EMA" in k for k in ckpt["callbacks"]), "the recipe's EMA callback did not run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    ema = [c["init_args"] for c in resolved["trainer"]["callbacks"] if c["class_path"].endswith(".EMA")]
    assert ema == [{**ema[0], "decay": 0.995, "warmup": False, "update_every_n_steps": 10,
                    "update_starting_at_step": 2000}]
