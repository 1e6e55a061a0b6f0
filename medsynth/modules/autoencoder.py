"""AutoencoderModule: trains a KL or VQ autoencoder with reconstruction losses, then adds a discriminator (GAN)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from medsynth.errors import MedsynthError
from medsynth.losses.adversarial import AdversarialLoss
from medsynth.losses.perceptual import PerceptualLoss
from medsynth.metrics import ms_ssim, psnr, ssim
from medsynth.metrics.reconstruction import MS_SSIM_MIN_SIDE
from medsynth.modules.optim import GANAdam, plain_callable
from medsynth.nets.autoencoders import KLAutoencoder
from medsynth.nets.tiling import encode_patchwise, reconstruct
from medsynth.writers import LatentWriter, ReconstructionWriter


def _built_from_config() -> bool:
    """Whether this module is being instantiated by LightningCLI (which hands its config over as hyperparameters)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without it: keep whatever save_hyperparameters sees
        return True
    return _given_hyperparameters.get() is not None


class AutoencoderModule(L.LightningModule):
    """An image/volume autoencoder (KL-VAE or PatchVolume VQ) for latent diffusion, in 2D or 3D.

    Stage 1 trains on patches with L1 plus the net's regulariser (KL, or the VQ commitment loss; the codebook
    follows the encoder by EMA) and, optionally, a perceptual loss from local weights. From
    ``adversarial_start_step`` on, a patch discriminator joins (VQGAN, Esser et al., 2021; 3D MedDiffusion, Wang et
    al., 2024): the generator adds its adversarial loss (and optionally feature matching), then the discriminator
    takes one step. Before that step the discriminator is never run, so it gets no gradient.

    Optimisation is manual. Only generator steps count as training steps: ``trainer.max_steps``, checkpoint
    intervals and ``adversarial_start_step`` all count generator updates (the discriminator's optimiser is stepped
    directly). Gradients are clipped by hand (``gradient_clip``); leave ``trainer.gradient_clip_val`` unset.

    Stage 2 (``freeze_encoder``, 3D MedDiffusion): start from a stage-1 checkpoint (``init_from``), freeze encoder
    and codebook, encode each training crop patch by patch (``encode_patch_size``) and train the decoder on the
    whole crop at once, so it learns to join patches seamlessly.

    Args:
        net: the autoencoder (:class:`~medsynth.nets.KLAutoencoder` or
            :class:`~medsynth.nets.PatchVolumeAutoencoder`); its ``in_channels`` must equal the data's channels.
            Default: a 2D KL autoencoder.
        discriminator: a patch discriminator (MONAI ``PatchDiscriminator`` with the net's ``spatial_dims``);
            ``None`` trains without the GAN phase.
        perceptual: a perceptual loss from local weights (:class:`~medsynth.losses.PerceptualLoss`); ``None`` for
            none.
        image_channels: image channels (linked from the data).
        image_size: training patch side in pixels/voxels (linked from the data); also the default tile for
            reconstructing whole images or volumes at predict.
        l1_weight: weight of the L1 reconstruction loss (3D MedDiffusion: 4).
        reg_weight: weight of the net's regulariser: the KL term (typically 1e-6) or the VQ commitment loss, which
            already holds its own 0.25 (use 1).
        perceptual_weight: weight of the perceptual loss.
        adversarial_criterion: ``hinge`` (VQGAN, 3D MedDiffusion) or ``least_squares``.
        adversarial_weight: weight of the generator's adversarial loss.
        adversarial_start_step: generator step from which the discriminator trains and the adversarial loss is
            added (3D MedDiffusion: 12k at 4x, 20k at 8x compression).
        feature_matching_weight: weight of discriminator feature matching in the generator loss; 0 disables.
        lr: generator learning rate.
        discriminator_lr: discriminator learning rate; default ``lr``.
        optimizer: optimiser class of both the generator and the discriminator; their learning rates are ``lr``
            and ``discriminator_lr``. Default: Adam with betas (0.5, 0.9), GAN practice.
        gradient_clip: maximum gradient norm of each optimiser's parameters; 0 disables.
        init_from: a stage-1 ``medsynth fit`` checkpoint whose autoencoder weights start this run (stage 2). Not
            needed when resuming (``--ckpt_path``).
        freeze_encoder: stage 2: train the decoder only; encoder and codebook are frozen.
        encode_patch_size: stage 2: patch side used to encode training crops patch by patch (the stage-1 patch).
        predict_patch_size: patch side for patch-wise encoding at predict; default ``image_size``.
        predict_tile: latent tile side for decoding at predict (overlapping tiles, Gaussian-blended); default
            twice the latent side of a predict patch (a 64 patch at 4x: 32 latent voxels, 128 output voxels), which
            bounds memory for any volume size; 0 decodes the whole latent at once (no seams, memory grows with the
            volume, as the reference does).
        predict_overlap: overlap fraction between decoding tiles.
        predict_output: what ``predict`` writes: ``reconstruction`` (images/volumes like the inputs) or ``latent``
            (the encoding of each input plus a latent manifest for latent diffusion; ``configs/encode3d.yaml``).
            Taken from the command line at predict, not from the checkpoint.
        latent_scaling: how encoded latents are scaled for diffusion, recorded in the latent manifest:
            ``minmax`` maps the dataset's latent range to [-1, 1] (3D MedDiffusion), ``std`` standardises to zero
            mean and unit variance (Rombach et al., 2022).
    """

    predict_time_args = ("predict_output", "latent_scaling")
    """Chosen at each ``predict`` (reconstruct or encode), not taken from the checkpoint."""

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        discriminator: Optional[nn.Module] = None,
        perceptual: Optional[PerceptualLoss] = None,
        image_channels: int = 1,
        image_size: int = 64,
        l1_weight: float = 1.0,
        reg_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        adversarial_criterion: Literal["hinge", "least_squares"] = "hinge",
        adversarial_weight: float = 0.1,
        adversarial_start_step: int = 10_000,
        feature_matching_weight: float = 0.0,
        lr: float = 1e-4,
        discriminator_lr: Optional[float] = None,
        optimizer: OptimizerCallable = GANAdam,
        gradient_clip: float = 1.0,
        init_from: Optional[Path] = None,
        freeze_encoder: bool = False,
        encode_patch_size: Optional[int] = None,
        predict_patch_size: Optional[int] = None,
        predict_tile: Optional[int] = None,
        predict_overlap: float = 0.25,
        predict_output: Literal["reconstruction", "latent"] = "reconstruction",
        latent_scaling: Literal["minmax", "std"] = "minmax",
    ) -> None:
        super().__init__()
        # Built by the CLI, the nets arrive as config (class path + arguments) and are saved with the checkpoint so
        # it rebuilds the module alone; built in Python, they are instances, which the weights already hold.
        self.save_hyperparameters(ignore=None if _built_from_config() else ["net", "discriminator", "perceptual", "optimizer"])
        self.automatic_optimization = False
        self.optimizer = plain_callable(optimizer)
        self.net = net if net is not None else KLAutoencoder(spatial_dims=2, in_channels=image_channels)
        if self.net.in_channels != image_channels:
            raise MedsynthError(f"model.net.in_channels={self.net.in_channels} but the data has "
                                f"{image_channels} channel(s); set both to the same count")
        if image_size % self.net.downsample_factor:
            raise MedsynthError(f"patch/image size {image_size} is not a multiple of the autoencoder's "
                                f"downsampling factor {self.net.downsample_factor}")
        if freeze_encoder and init_from is None:
            raise MedsynthError("stage 2 (model.freeze_encoder: true) needs a stage-1 checkpoint: "
                                "--model.init_from STAGE1.ckpt")
        if not 0.0 <= predict_overlap < 1.0:
            raise MedsynthError(f"model.predict_overlap={predict_overlap} must lie in [0, 1)")
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.adversarial = AdversarialLoss(adversarial_criterion)
        self.image_channels = image_channels
        self.image_size = image_size
        self.init_from = Path(init_from) if init_from is not None else None
        self.freeze_encoder = freeze_encoder
        self.encode_patch_size = encode_patch_size or image_size

    @property
    def spatial_dims(self) -> int:
        return self.net.spatial_dims

    @property
    def gan_active(self) -> bool:
        """Whether the adversarial phase has begun (counted in generator steps)."""
        return self.discriminator is not None and self.global_step >= self.hparams.adversarial_start_step

    # ----------------------------------------------------------------- stage 2
    def setup(self, stage: str) -> None:
        # Runs before a resumed checkpoint is restored, so --ckpt_path still wins over init_from.
        if stage == "fit" and self.init_from is not None:
            self._load_stage1(self.init_from)
        if self.freeze_encoder:
            for p in self.net.parameters():
                p.requires_grad_(False)
            for m in self.net.decoder_modules():
                for p in m.parameters():
                    p.requires_grad_(True)

    def check_fit_inputs(self, datamodule=None) -> None:
        """Refuse a missing or foreign stage-1 checkpoint before training starts (the CLI calls this)."""
        if self.init_from is not None:
            self._read_stage1(self.init_from)

    def _read_stage1(self, path: Path) -> dict:
        if not path.is_file():
            raise MedsynthError(f"{path}: stage-1 checkpoint (model.init_from) does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
        except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
            raise MedsynthError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        if not net_state:
            raise MedsynthError(f"{path}: not an autoencoder checkpoint (no autoencoder weights)")
        own = self.net.state_dict()
        bad = [k for k, v in net_state.items() if k not in own or own[k].shape != v.shape]
        missing = [k for k in own if k not in net_state]
        if bad or missing:
            what = f"unexpected or misshaped '{bad[0]}'" if bad else f"missing '{missing[0]}'"
            raise MedsynthError(f"{path}: its autoencoder weights do not fit model.net ({what}); give the stage-1 "
                                "checkpoint of this architecture")
        return state

    def _load_stage1(self, path: Path) -> None:
        state = self._read_stage1(path)
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        self.net.load_state_dict(net_state)
        disc = {k[len("discriminator."):]: v for k, v in state.items() if k.startswith("discriminator.")}
        if disc and self.discriminator is not None:
            try:
                self.discriminator.load_state_dict(disc)
            except RuntimeError:
                pass  # a differently shaped discriminator starts afresh; the autoencoder is what stage 2 needs

    def train(self, mode: bool = True) -> "AutoencoderModule":
        super().train(mode)
        if self.freeze_encoder:  # frozen parts stay in eval mode: no codebook EMA, fixed normalisation
            self.net.eval()
            for m in self.net.decoder_modules():
                m.train(mode)
        return self

    # ----------------------------------------------------------------- reconstruction
    def reconstruct_batch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction ``(B, C, *spatial)`` and regulariser (scalar) of a training/validation batch."""
        if self.freeze_encoder:
            with torch.no_grad():
                z = encode_patchwise(self.net.encode, x, self.encode_patch_size, self.net.downsample_factor)
            return self.net.decode(z)[(..., *[slice(0, s) for s in x.shape[2:]])], x.new_zeros(())
        return self.net(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruct a whole image or volume ``(B, C, *spatial)`` of any size, patch by patch (predict)."""
        patch = self.hparams.predict_patch_size or self.image_size
        tile = self.hparams.predict_tile
        if tile is None:
            tile = 2 * patch // self.net.downsample_factor
        return reconstruct(self.net, x, patch, decode_tile=tile or None, overlap=self.hparams.predict_overlap)

    # ----------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if "16-mixed" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            raise MedsynthError("AutoencoderModule trains with 32-true or bf16-mixed precision (16-mixed's loss "
                                "scaling does not fit the manual GAN step)")
        if self.trainer.world_size > 1:  # different noise/dead-code draws per rank
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def _set_discriminator_grad(self, on: bool) -> None:
        for p in self.discriminator.parameters():
            p.requires_grad_(on)

    def _clip(self, optimizer) -> None:
        if self.hparams.gradient_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm")

    def generator_loss(self, x: Tensor, recon: Tensor, reg: Tensor, gan: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's total loss and its parts, for input ``x`` and reconstruction ``recon``."""
        hp = self.hparams
        parts = {"l1": F.l1_loss(recon.float(), x.float()), "reg": reg.float()}
        loss = hp.l1_weight * parts["l1"] + hp.reg_weight * parts["reg"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(recon.float(), x.float())
            loss = loss + hp.perceptual_weight * parts["perceptual"]
        if gan:
            fake = self.discriminator(recon)
            parts["adversarial"] = self.adversarial.generator(fake)
            loss = loss + hp.adversarial_weight * parts["adversarial"]
            if hp.feature_matching_weight > 0:
                with torch.no_grad():
                    real = self.discriminator(x)
                parts["feature_matching"] = self.adversarial.feature_matching(real, fake)
                loss = loss + hp.feature_matching_weight * parts["feature_matching"]
        return loss, parts

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["image"]  # (B, C, *spatial) in [-1, 1]
        optimizers = self.optimizers()
        opt_g = optimizers[0] if isinstance(optimizers, list) else optimizers
        gan = self.gan_active
        if self.discriminator is not None:
            self._set_discriminator_grad(False)
        recon, reg = self.reconstruct_batch(x)
        loss, parts = self.generator_loss(x, recon, reg, gan)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_g)
        opt_g.step()  # a LightningOptimizer: counts as the training step
        n = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        self.log("train/lr", opt_g.param_groups[0]["lr"], batch_size=n)
        quantizer = getattr(self.net, "quantizer", None)
        if quantizer is not None and getattr(quantizer, "last_perplexity", None) is not None:
            self.log("train/codebook_perplexity", quantizer.last_perplexity, batch_size=n)
            self.log("train/codes_restarted", float(quantizer.last_restarted), batch_size=n)
        if gan:
            opt_d = optimizers[1]
            self._set_discriminator_grad(True)
            d_loss = self.adversarial.discriminator(self.discriminator(x), self.discriminator(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.optimizer.step()  # the raw optimiser: discriminator steps do not count as training steps
            self.log("train/discriminator", d_loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad] if self.freeze_encoder else self.net.parameters()
        opt_g = self.optimizer(params, lr=hp.lr)
        if self.discriminator is None:
            return opt_g
        opt_d = self.optimizer(self.discriminator.parameters(), lr=hp.discriminator_lr or hp.lr)
        return [opt_g, opt_d]

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, prefix: str) -> dict:
        x = batch["image"]
        recon, reg = self.reconstruct_batch(x)
        recon = recon.float().clamp(-1, 1)
        n = x.shape[0]
        l1 = F.l1_loss(recon, x.float())
        self.log(f"{prefix}/loss", l1, prog_bar=True, sync_dist=True, batch_size=n)
        self.log(f"{prefix}/psnr", psnr(recon, x).mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log(f"{prefix}/ssim", ssim(recon, x).mean(), sync_dist=True, batch_size=n)
        if min(x.shape[2:]) >= MS_SSIM_MIN_SIDE:  # three dyadic scales of a 7-voxel window must fit
            self.log(f"{prefix}/ms_ssim", ms_ssim(recon, x).mean(), sync_dist=True, batch_size=n)
        return {"image": x.detach(), "reconstruction": recon.detach()}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, "test")

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Latent ``(B, latent_channels, *padded_spatial / f)`` of a whole image or volume, patch by patch; sides
        are padded (with -1, background) to a multiple of the predict patch."""
        patch = self.hparams.predict_patch_size or self.image_size
        return encode_patchwise(self.net.encode, x, patch, self.net.downsample_factor)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if "image" not in batch:
            raise MedsynthError("the autoencoder needs images to predict from, but the data gives none "
                                "(2D: --data.predict_images true)")
        if self.hparams.predict_output == "latent":
            out = {"latent": self.encode(batch["image"]).float().cpu(),
                   "image_shape": [list(batch["image"].shape[2:])] * batch["image"].shape[0]}
        else:
            out = {"reconstruction": self.reconstruct(batch["image"]).float().clamp(-1, 1).cpu()}
        for key, value in batch.items():
            if key != "image":
                out[key] = value.cpu() if isinstance(value, Tensor) else value
        return out

    def latent_description(self) -> dict:
        """What a latent manifest records about the autoencoder that made the latents."""
        return {"class_path": f"{type(self.net).__module__}.{type(self.net).__name__}",
                "spatial_dims": self.net.spatial_dims, "latent_channels": self.net.latent_channels,
                "downsample_factor": self.net.downsample_factor,
                "patch_size": self.hparams.predict_patch_size or self.image_size}

    def prediction_writer(self, output_dir: Path, metadata: dict, config: Optional[dict]):
        """The callback that writes this module's predictions (reconstructions or latents) under ``output_dir``
        (latents record their encoder in the latent manifest, not the run's config)."""
        if self.hparams.predict_output == "latent":
            return LatentWriter(output_dir, metadata=metadata, scaling=self.hparams.latent_scaling)
        return ReconstructionWriter(output_dir, metadata=metadata, config=config)
