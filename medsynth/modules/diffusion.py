"""DiffusionModule: trains a denoising net with an objective and samples from it with a sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from medsynth.contracts import NetFactory
from medsynth.diffusion.conditioning import MaskEncoding, MaskPatchEmbedding, check_guidance, mask_channels
from medsynth.diffusion.objectives import DDPMObjective, Objective
from medsynth.diffusion.samplers import DDIMSampler, Sampler
from medsynth.errors import MedsynthError
from medsynth.loading import read_init_weights
from medsynth.modules.checks import check_training_shapes
from medsynth.modules.codec import LatentCodec
from medsynth.modules.conditioned import Conditioned, channels_last_format
from medsynth.modules.generation import Generation
from medsynth.modules.optim import plain_callable, warmup_schedule
from medsynth.nets.unet2d import UNet2D


class DiffusionModule(Generation, Conditioned, L.LightningModule):
    """A denoising diffusion model, unconditional or guided by masks or class labels, in pixel or latent space.

    The net sees the noised image with the encoded mask concatenated as extra channels (Konz et al., 2024,
    "Anatomically-Controllable Medical Image Generation with Segmentation-Guided Diffusion Models").

    Args:
        net: the denoising net, built with ``(image_channels + mask channels, image_channels)``.
            Default: :class:`~medsynth.nets.UNet2D` with its defaults.
        objective: training objective and noise schedule. Default: DDPM with epsilon prediction, 1000 steps.
        sampler: sampling loop for predict and preview grids. Default: DDIM, 50 steps, eta 0. At predict time the
            sampler given on the command line is used, not the one stored in the checkpoint.
        num_classes: mask classes counting background; 0 trains an unconditional model (linked from the data).
        image_channels: image channels (linked from the data).
        image_size: image side in pixels, used for unconditional sampling (linked from the data).
        mask_encoding: ``one_hot`` (K channels), ``scalar`` (one channel holding k/255, the reference's) or
            ``patch_embedding`` (latent space: image-resolution one-hot masks through a learned patch embedding,
            :class:`~medsynth.diffusion.conditioning.MaskPatchEmbedding`, to ``mask_embedding_channels``).
        mask_ablation_prob: during training, remove each non-background class from each sample's mask with this
            probability, so sampling can condition on any subset of classes. 0 disables.
        class_names: class labels' names, in label order, for class-conditional models (linked from the data;
            ``None``: no class conditioning). Labels enter through the UNet's class embedding.
        label_drop_prob: during training, replace each sample's conditioning (class label and/or mask) by a null
            condition with this probability, which lets sampling use classifier-free guidance (Ho & Salimans,
            2022). 0 disables.
        guidance_scale: classifier-free guidance weight at sampling: 1 samples the plain conditional model, larger
            values follow the condition more strongly; needs ``label_drop_prob > 0`` in training. ``auto``: 2 for
            a model that was trained so (mask- or class-conditional, ``label_drop_prob > 0``), else 1. Like the
            sampler, it is taken from the command line at predict time.
        lr: peak learning rate.
        optimizer: optimiser class; its learning rate is ``lr``.
        lr_warmup_steps: linear warm-up steps before the cosine decay.
        lr_schedule: ``cosine`` decays to 0 over the run's optimiser steps after warm-up; ``constant`` holds ``lr``.
        sample_seed: seed of sampling noise; a sample depends only on it and its index.
        output: what the generated channels are: ``image``, or ``mask`` for a mask generator (one-hot channels in
            [-1, 1], decoded by argmax at predict; linked from the data).
        compile: compile the net with ``torch.compile`` (in ``setup``, with ``nn.Module.compile``, so state-dict
            keys and checkpoints are unchanged); pays off on GPUs for long runs.
        channels_last: keep the net's weights and inputs in channels-last memory order (``channels_last`` for 2D,
            ``channels_last_3d`` for 3D), which tensor-core convolutions prefer under bf16/fp16 on GPUs; numbers
            and checkpoints are unchanged. Off by default: on CPUs it is usually slower.
        sample_shape: spatial shape of sampled images (2D/3D; latent voxels in latent space), e.g. ``[16, 16, 16]``
            (linked from the data; default ``image_size`` squared). Sizes the net cannot produce are refused before
            sampling starts.
        latent_space: set when the model learns autoencoder latents (linked from a
            :class:`~medsynth.data.LatentDataModule`): how they were scaled and which autoencoder decodes them
            (see :class:`~medsynth.modules.codec.LatentCodec`, which loads it only to sample).
        autoencoder: an autoencoder checkpoint to decode with instead of the one the latents name (the same file:
            its SHA-256 is checked). Taken from the command line at predict.
        decode_tile: latent tile side for decoding large samples in blended tiles; ``None``: the autoencoder's
            default, 0: whole. Taken from the command line at predict.
        init_from: a ``medsynth fit`` or ``medsynth import`` checkpoint of the same architecture whose weights (its
            ``state_dict``: the EMA weights where EMA was used) start this run: fine-tuning. Optimiser, schedule and
            step count start afresh; resuming with ``--ckpt_path`` restores that checkpoint instead.
    """

    predict_time_args = ("sampler", "sample_seed", "guidance_scale", "autoencoder", "decode_tile")
    """Chosen at each ``predict``, not taken from the checkpoint (see :class:`~medsynth.contracts.DeclaresPredictArgs`)."""

    def __init__(
        self,
        net: Optional[NetFactory] = None,
        objective: Optional[Objective] = None,
        sampler: Optional[Sampler] = None,
        num_classes: int = 0,
        image_channels: int = 1,
        image_size: int = 64,
        mask_encoding: MaskEncoding = "one_hot",
        mask_embedding_channels: int = 32,
        mask_ablation_prob: float = 0.0,
        class_names: Optional[list[str]] = None,
        label_drop_prob: float = 0.0,
        guidance_scale: Union[float, Literal["auto"]] = 1.0,
        lr: float = 1e-4,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_warmup_steps: int = 500,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        sample_seed: int = 0,
        output: Literal["image", "mask"] = "image",
        compile: bool = False,
        channels_last: bool = False,
        sample_shape: Optional[list[int]] = None,
        latent_space: Optional[dict] = None,
        autoencoder: Optional[Path] = None,
        decode_tile: Optional[int] = None,
        init_from: Optional[Path] = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ablation_prob <= 1.0:
            raise MedsynthError(f"model.mask_ablation_prob={mask_ablation_prob} must lie in [0, 1]")
        if not 0.0 <= label_drop_prob < 1.0:
            raise MedsynthError(f"model.label_drop_prob={label_drop_prob} must lie in [0, 1)")
        check_guidance(guidance_scale)
        self.save_hyperparameters()
        self.num_classes, self.image_channels, self.image_size = num_classes, image_channels, image_size
        self.mask_encoding, self.mask_ablation_prob = mask_encoding, mask_ablation_prob
        self.class_names = list(class_names) if class_names else None
        self.label_drop_prob, self.guidance_scale = label_drop_prob, guidance_scale
        self.lr, self.optimizer = lr, plain_callable(optimizer)
        self.lr_warmup_steps, self.lr_schedule = lr_warmup_steps, lr_schedule
        self.sample_seed, self.compile_net, self.output = sample_seed, compile, output
        self.channels_last = channels_last
        self.sample_shape = list(sample_shape) if sample_shape else None
        self.latent_space = dict(latent_space) if latent_space else None
        self.init_from = Path(init_from) if init_from is not None else None
        # the frozen autoencoder that decodes latent samples: a plain attribute, so never trained, saved or averaged
        self.latent_codec = (LatentCodec(latent_space, autoencoder, decode_tile, image_channels)
                             if latent_space else None)
        self.objective = objective if objective is not None else DDPMObjective()
        self.sampler = sampler if sampler is not None else DDIMSampler()
        self.sampler.check(self.objective)
        self.mask_block = int((latent_space or {}).get("downsample_factor") or 1)  # image voxels per latent voxel
        self.mask_embedding = (MaskPatchEmbedding(num_classes, mask_embedding_channels, self.mask_block,
                                                  len(sample_shape or (0, 0)))
                               if num_classes and mask_encoding == "patch_embedding" else None)
        in_channels = image_channels + mask_channels(num_classes, mask_encoding, mask_embedding_channels)
        # one embedding per label plus the null label that classifier-free guidance drops to
        extra = {"num_class_embeds": self.num_labels + 1} if self.class_conditional else {}
        self.net = (net or UNet2D)(in_channels, image_channels, **extra)

    # ----------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        # Runs before a resumed checkpoint is restored, so --ckpt_path still wins over init_from.
        if stage == "fit" and self.init_from is not None:
            self.load_state_dict(read_init_weights(self.init_from, self))
        self.prepare_net()

    def prepare_net(self) -> None:
        """Channels-last weights and ``torch.compile`` when asked for (idempotent). Done in ``setup``, not in
        ``configure_model``: Lightning's weight averaging warns about sharding for any module that overrides the
        latter. Loading a checkpoint afterwards keeps the memory order (tensors are copied into place)."""
        if self.channels_last:  # before compiling, so the compiled graph sees the layout it will run with
            volumetric = any(p.ndim == 5 for p in self.net.parameters())  # 3D convolutions' weights
            self.net.to(memory_format=channels_last_format(5 if volumetric else 4))
        # Compile the net only: Dynamo cannot trace the LightningModule (self.log); nn.Module.compile keeps keys.
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def on_fit_start(self) -> None:
        # seed_everything gives every DDP rank the same seed, so every rank would draw the same noise, timesteps
        # and condition drops: offset the global generator by the rank (data order has its own sampler seed).
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def diffusion_loss(self, batch: dict, generator: Optional[torch.Generator] = None) -> Tensor:
        """The objective's weighted error (squared or absolute) on one batch; ``generator`` fixes noise and timesteps."""
        x0 = batch["image"]  # (B, C, *spatial) in [-1, 1]
        cond, labels = self.condition(batch, train=self.training, generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0) if generator else torch.randn_like(x0)
        t = self.objective.sample_timesteps(x0.shape[0], generator).to(x0.device)
        xt = self.objective.add_noise(x0, noise, t)
        pred = self.denoise(xt, t, cond, labels)
        target = self.objective.target(x0, noise, t)
        per_sample = self.objective.error(pred.float(), target.float()).flatten(1).mean(1)
        return (per_sample * self.objective.loss_weight(t).to(per_sample)).mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.diffusion_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._fixed_noise_loss(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._fixed_noise_loss(batch, batch_idx, "test")

    def _fixed_noise_loss(self, batch: dict, batch_idx: int, split: str) -> Tensor:
        # The same noise and timesteps every epoch, so the loss moves only with the weights.
        generator = torch.Generator().manual_seed({"val": 10_000, "test": 20_000}[split] + batch_idx)
        loss = self.diffusion_loss(batch, generator)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        opt = self.optimizer(self.parameters(), lr=self.lr)  # the net and any mask embedding
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": warmup_schedule(opt, self.lr_warmup_steps, total, self.lr_schedule)}

    def check_fit_inputs(self, datamodule=None) -> None:
        """Refuse, before anything is written, an ``init_from`` checkpoint whose weights do not fit and training
        shapes the net cannot denoise (e.g. a latent crop size BiFlowNet's sub-volumes do not divide)."""
        if self.init_from is not None:
            read_init_weights(self.init_from, self)
        check_training_shapes(self.net, datamodule)
