"""AutoencoderModule: the GAN phase starts at its step, steps count generator updates, stage 2 freezes the encoder."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from monai.networks.nets import PatchDiscriminator
from torch.utils.data import DataLoader, Dataset

from medsynth.errors import MedsynthError
from medsynth.modules import AutoencoderModule
from medsynth.nets import KLAutoencoder, PatchVolumeAutoencoder


class Images(Dataset):
    """Smooth random images or volumes ``(C, *spatial)`` in [-1, 1]."""

    def __init__(self, n: int, shape: tuple[int, ...], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, *shape, generator=g) * 2 - 1
        pool = torch.nn.functional.avg_pool2d if len(shape) == 3 else torch.nn.functional.avg_pool3d
        self.x = pool(x, 3, stride=1, padding=1).clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i]}


def tiny_kl(spatial_dims: int = 2) -> KLAutoencoder:
    return KLAutoencoder(spatial_dims=spatial_dims, in_channels=1, channels=(8, 16), latent_channels=2,
                         num_res_blocks=1, norm_num_groups=4)


def tiny_vq(spatial_dims: int = 3) -> PatchVolumeAutoencoder:
    return PatchVolumeAutoencoder(spatial_dims=spatial_dims, in_channels=1, channels=(8, 16), latent_channels=4,
                                  num_codes=32, norm_num_groups=4)


def tiny_disc(spatial_dims: int = 2, layers: int = 2) -> PatchDiscriminator:
    return PatchDiscriminator(spatial_dims=spatial_dims, in_channels=1, channels=8, num_layers_d=layers)


def trainer(tmp_path, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                     default_root_dir=tmp_path, accelerator="cpu", devices=1)


class DiscriminatorWatch(L.Callback):
    """Records, per generator step, whether the discriminator's weights changed and whether it had gradients."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.had_grad: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.discriminator.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = list(pl_module.discriminator.parameters())
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self._before, params)))
        self.had_grad.append(any(p.grad is not None and p.grad.abs().sum() > 0 for p in params))


def test_gan_phase_starts_at_its_step_and_steps_count_generator_updates(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(net=tiny_kl(), discriminator=tiny_disc(), image_size=16, adversarial_start_step=3,
                               feature_matching_weight=1.0, lr=1e-3)
    watch = DiscriminatorWatch()
    t = trainer(tmp_path, max_steps=6, callbacks=[watch])
    t.fit(module, DataLoader(Images(8, (1, 16, 16)), batch_size=2))
    assert t.global_step == 6  # generator steps only, though the discriminator stepped too
    assert watch.changed == [False, False, False, True, True, True]
    assert watch.had_grad[:3] == [False, False, False]
    opt_d = t.optimizers[1]
    assert all(int(opt_d.state[p]["step"]) == 3 for p in module.discriminator.parameters())
    opt_g = t.optimizers[0]
    assert all(int(opt_g.state[p]["step"]) == 6 for p in module.net.parameters())


def test_without_discriminator_only_the_autoencoder_trains_and_loss_falls(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(net=tiny_kl(), image_size=16, lr=3e-3)
    data = Images(4, (1, 16, 16))
    x = torch.stack([data[i]["image"] for i in range(4)])
    module.eval()
    before = module.generator_loss(x, *module.net(x), gan=False)[1]["l1"].item()
    t = trainer(tmp_path, max_steps=40)
    t.fit(module, DataLoader(data, batch_size=4))
    module.eval()
    after = module.generator_loss(x, *module.net(x), gan=False)[1]["l1"].item()
    assert len(t.optimizers) == 1
    assert after < 0.7 * before


def test_stage2_freezes_encoder_and_codebook_and_trains_the_decoder(tmp_path):
    torch.manual_seed(0)
    stage1 = AutoencoderModule(net=tiny_vq(), image_size=8, reg_weight=1.0)
    t1 = trainer(tmp_path / "s1", max_steps=2)
    t1.fit(stage1, DataLoader(Images(4, (1, 8, 8, 8)), batch_size=2))
    ckpt = tmp_path / "stage1.ckpt"
    t1.save_checkpoint(ckpt)

    stage2 = AutoencoderModule(net=tiny_vq(), image_size=16, reg_weight=1.0, init_from=ckpt, freeze_encoder=True,
                               encode_patch_size=8, lr=1e-2)
    t2 = trainer(tmp_path / "s2", max_steps=3)
    stage2.setup("fit")  # loads stage 1 (fit calls it again; loading twice is harmless)
    named = dict(stage2.net.named_parameters()) | dict(stage2.net.named_buffers())
    start = {k: v.detach().clone() for k, v in named.items()}
    s1 = {k[4:]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(start[k], s1[k]) for k in s1)  # starts from stage 1
    t2.fit(stage2, DataLoader(Images(2, (1, 16, 16, 16)), batch_size=1))
    decoder = {id(t) for m in stage2.net.decoder_modules() for t in [*m.parameters(), *m.buffers()]}
    frozen = [k for k, v in named.items() if id(v) not in decoder]
    trained = [k for k, v in named.items() if id(v) in decoder and v.is_floating_point()]
    assert frozen and trained
    assert all(torch.equal(start[k], named[k]) for k in frozen)  # encoder, codebook and its EMA statistics
    assert any(not torch.equal(start[k], named[k]) for k in trained)


def test_stage2_without_stage1_checkpoint_is_refused():
    with pytest.raises(MedsynthError, match="stage-1 checkpoint"):
        AutoencoderModule(net=tiny_vq(), image_size=8, freeze_encoder=True)


def test_channel_and_size_mismatches_are_refused():
    with pytest.raises(MedsynthError, match="channel"):
        AutoencoderModule(net=tiny_kl(), image_channels=3, image_size=16)
    with pytest.raises(MedsynthError, match="multiple"):
        AutoencoderModule(net=tiny_kl(), image_size=15)


def test_3d_vq_module_trains_and_reconstructs_a_volume_larger_than_its_patch(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(net=tiny_vq(), discriminator=tiny_disc(3, layers=1), image_size=8, reg_weight=1.0,
                               adversarial_start_step=1)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, DataLoader(Images(4, (1, 8, 8, 8)), batch_size=2))
    volume = torch.rand(1, 1, 20, 12, 9) * 2 - 1
    out = module.eval().predict_step({"image": volume, "name": ["v"]}, 0)
    assert out["reconstruction"].shape == volume.shape
    assert torch.isfinite(out["reconstruction"]).all()
    assert out["name"] == ["v"]


class BatchSizes(L.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(batch["image"].shape[-1])


def test_progressive_resolution_moves_up_on_a_plateau_and_resumes_there(tmp_path, seg_dataset):
    from medsynth.callbacks import ProgressiveResolution
    from medsynth.data import SegGuidedImageDataModule

    img_dir, _ = seg_dataset
    torch.manual_seed(0)

    def run(max_steps: int, ckpt=None):
        dm = SegGuidedImageDataModule(img_dir=str(img_dir), image_size=8, batch_size=4, num_workers=0)
        seen, prog = BatchSizes(), ProgressiveResolution(sizes=[8, 16], patience=1, min_delta=10.0)  # every val: plateau
        module = AutoencoderModule(net=tiny_kl(), image_size=8)
        t = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[seen, prog], default_root_dir=tmp_path,
                      reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0)
        t.fit(module, datamodule=dm, ckpt_path=ckpt)
        return t, seen, prog

    t, seen, prog = run(6)  # 8 training images, batch 4: 2 steps per epoch
    assert seen.sizes[:2] == [8, 8] and set(seen.sizes[2:]) == {16}
    assert prog.stage == 1
    t.save_checkpoint(tmp_path / "p.ckpt")
    _, seen2, prog2 = run(8, ckpt=tmp_path / "p.ckpt")
    assert prog2.stage == 1 and seen2.sizes and set(seen2.sizes) == {16}


class GradNorms(L.Callback):
    """Records the autoencoder's gradient norm as each generator step reaches its optimiser."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if optimizer is trainer.optimizers[0]:
            grads = [p.grad.flatten() for p in pl_module.net.parameters() if p.grad is not None]
            self.norms.append(float(torch.cat(grads).norm()))


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradients_are_clipped_by_hand(tmp_path, clip):
    torch.manual_seed(0)
    module = AutoencoderModule(net=tiny_kl(), discriminator=tiny_disc(), image_size=16, adversarial_start_step=1,
                               lr=1e-3, gradient_clip=clip)
    norms = GradNorms()
    trainer(tmp_path, max_steps=3, callbacks=[norms]).fit(module, DataLoader(Images(6, (1, 16, 16)), batch_size=2))
    assert len(norms.norms) == 3
    if clip:
        assert max(norms.norms) <= clip * 1.001  # every generator step, the GAN steps included
    else:
        assert min(norms.norms) > 1e-2  # unclipped, the same run's gradients are far larger


def test_validation_logs_psnr_ssim_and_ms_ssim(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(net=tiny_kl(), image_size=32, lr=1e-3)
    data = DataLoader(Images(4, (1, 32, 32)), batch_size=2)
    t = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    t.fit(module, data, data)
    m = t.callback_metrics
    assert {"val/loss", "val/psnr", "val/ssim", "val/ms_ssim"} <= set(m)
    # the logged values are the metrics of the reconstructions (mean over the validation set)
    from medsynth.metrics import ms_ssim, psnr, ssim

    module.eval()
    x = torch.stack([data.dataset[i]["image"] for i in range(4)])
    with torch.no_grad():
        recon = module.reconstruct_batch(x)[0].float().clamp(-1, 1)
    for name, fn in (("psnr", psnr), ("ssim", ssim), ("ms_ssim", ms_ssim)):
        assert float(m[f"val/{name}"]) == pytest.approx(float(fn(recon, x).mean()), abs=1e-4), name
