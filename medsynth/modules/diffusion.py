"""DiffusionModule: trains a denoising net with an objective and samples from it with a sampler."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from medsynth.contracts import ChecksSpatialShape
from medsynth.diffusion.conditioning import (
    MaskEncoding,
    ablate_mask,
    check_guidance,
    drop_condition,
    encode_mask,
    guided,
    mask_channels,
    null_condition,
)
from medsynth.diffusion.objectives import DDPMObjective, Objective
from medsynth.diffusion.samplers import DDIMSampler, Sampler, initial_noise, sample_generators
from medsynth.errors import MedsynthError
from medsynth.loading import check_checkpoint, check_weights_fit
from medsynth.modules.codec import LatentCodec
from medsynth.modules.optim import plain_callable, warmup_schedule
from medsynth.nets.unet2d import UNet2D

NetFactory = Callable[[int, int], nn.Module]
"""Builds the denoising net from ``(in_channels, out_channels)``; in YAML, a class path with its other arguments."""


class DiffusionModule(L.LightningModule):
    """A denoising diffusion model, unconditional or guided by segmentation masks, in pixel space.

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
        mask_encoding: ``one_hot`` (K channels) or ``scalar`` (one channel holding k/255, the reference's).
        mask_ablation_prob: during training, remove each non-background class from each sample's mask with this
            probability, so sampling can condition on any subset of classes. 0 disables.
        class_names: class labels' names, in label order, for class-conditional models (linked from the data;
            ``None``: no class conditioning). Labels enter through the UNet's class embedding.
        label_drop_prob: during training, replace each sample's conditioning (class label and/or mask) by a null
            condition with this probability, which lets sampling use classifier-free guidance (Ho & Salimans,
            2022). 0 disables.
        guidance_scale: classifier-free guidance weight at sampling: 1 samples the plain conditional model, larger
            values follow the condition more strongly; needs ``label_drop_prob > 0`` in training. Like the sampler,
            it is taken from the command line at predict time.
        lr: peak learning rate.
        optimizer: optimiser class; its learning rate is ``lr``.
        lr_warmup_steps: linear warm-up steps before the cosine decay.
        lr_schedule: ``cosine`` decays to 0 over the run's optimiser steps after warm-up; ``constant`` holds ``lr``.
        sample_seed: seed of sampling noise; a sample depends only on it and its index.
        output: what the generated channels are: ``image``, or ``mask`` for a mask generator (one-hot channels in
            [-1, 1], decoded by argmax at predict; linked from the data).
        compile: compile the net with ``torch.compile`` (inside ``configure_model``, so state-dict keys and
            checkpoints are unchanged); pays off on GPUs for long runs.
        sample_shape: spatial shape of sampled images (2D/3D; latent voxels in latent space), e.g. ``[16, 16, 16]``
            (linked from the data; default ``image_size`` squared). Sizes the net cannot produce are refused before
            sampling starts.
        latent_space: set when the model learns autoencoder latents (linked from a
            :class:`~medsynth.data.LatentDataModule`): the latents' scaling (``shift``, ``scale``), the autoencoder
            checkpoint and its SHA-256, channels, downsampling factor and the output voxel spacing. Samples are
            unscaled and decoded with that autoencoder, which is loaded only to sample, frozen, and never part of
            the trained weights, the checkpoint or the EMA average.
        autoencoder: an autoencoder checkpoint to decode with instead of the one the latents name (it must be
            the same file: its SHA-256 is checked). Taken from the command line at predict.
        decode_tile: latent tile side for decoding large samples in overlapping, blended tiles; ``None`` uses the
            autoencoder's own default, 0 decodes whole. Taken from the command line at predict.
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
        mask_ablation_prob: float = 0.0,
        class_names: Optional[list[str]] = None,
        label_drop_prob: float = 0.0,
        guidance_scale: float = 1.0,
        lr: float = 1e-4,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_warmup_steps: int = 500,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        sample_seed: int = 0,
        output: Literal["image", "mask"] = "image",
        compile: bool = False,
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
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.image_size = image_size
        self.mask_encoding = mask_encoding
        self.mask_ablation_prob = mask_ablation_prob
        self.class_names = list(class_names) if class_names else None
        self.label_drop_prob = label_drop_prob
        self.guidance_scale = guidance_scale
        self.lr = lr
        self.optimizer = plain_callable(optimizer)
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_schedule = lr_schedule
        self.sample_seed = sample_seed
        self.compile_net = compile
        self.output = output
        self.sample_shape = list(sample_shape) if sample_shape else None
        self.latent_space = dict(latent_space) if latent_space else None
        self.autoencoder = Path(autoencoder) if autoencoder else None
        self.decode_tile = decode_tile
        self.init_from = Path(init_from) if init_from is not None else None
        # the frozen autoencoder that decodes latent samples: a plain attribute, so never trained, saved or averaged
        self.latent_codec = (LatentCodec(latent_space, autoencoder, decode_tile, image_channels)
                             if latent_space else None)
        self.objective = objective if objective is not None else DDPMObjective()
        self.sampler = sampler if sampler is not None else DDIMSampler()
        self.sampler.check(self.objective)
        in_channels = image_channels + mask_channels(num_classes, mask_encoding)
        # one embedding per label plus the null label that classifier-free guidance drops to
        extra = {"num_class_embeds": self.num_labels + 1} if self.class_conditional else {}
        self.net = (net or UNet2D)(in_channels, image_channels, **extra)

    # ----------------------------------------------------------------- conditioning
    @property
    def conditional(self) -> bool:
        """Whether the model is mask-guided."""
        return self.num_classes > 0

    @property
    def class_conditional(self) -> bool:
        return self.class_names is not None

    @property
    def num_labels(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def condition(
        self, batch: dict, train: bool = False, generator: Optional[torch.Generator] = None
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The net's conditioning for a batch: encoded mask channels ``(B, K|1, *spatial)`` and labels ``(B,)``.

        In training (``train``), masks are ablated and, with ``label_drop_prob``, whole conditions are replaced
        by the null condition (one draw per sample, shared by mask and label).
        """
        cond = labels = None
        if self.conditional:
            mask = batch.get("mask")
            if mask is None:
                raise MedsynthError("this model is mask-guided (num_classes > 0) but the data gives no masks")
            if train:
                mask = ablate_mask(mask, self.num_classes, self.mask_ablation_prob, generator)
            cond = encode_mask(mask, self.num_classes, self.mask_encoding)
        if self.class_conditional:
            labels = batch.get("label")
            if labels is None:
                raise MedsynthError("this model is class-conditional but the data gives no class labels")
        if train:
            cond, labels = drop_condition(cond, labels, self.null_condition(cond, labels), self.label_drop_prob,
                                          generator)
        return cond, labels

    def null_condition(self, cond: Optional[Tensor], labels: Optional[Tensor]):
        """The null condition shaped like ``cond``/``labels`` (see :func:`~medsynth.diffusion.null_condition`)."""
        return null_condition(cond, labels, self.mask_encoding, self.num_labels)

    def denoise(self, xt: Tensor, t: Tensor, cond: Optional[Tensor], labels: Optional[Tensor] = None) -> Tensor:
        """The net's output for noised ``xt`` ``(B, C, *spatial)`` at ``t`` ``(B,)`` given mask channels ``cond``
        and class ``labels``."""
        x = xt if cond is None else torch.cat([xt, cond.to(xt.dtype)], dim=1)
        return self.net(x, t) if labels is None else self.net(x, t, class_labels=labels)

    def configure_model(self) -> None:
        # Compile the net only: Dynamo cannot trace the LightningModule (self.log); nn.Module.compile keeps keys.
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    # ----------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        # Runs before a resumed checkpoint is restored, so --ckpt_path still wins over init_from.
        if stage == "fit" and self.init_from is not None:
            self.load_state_dict(self._read_init_from())

    def _read_init_from(self) -> dict:
        """The weights of ``init_from``, checked to fit this model (one line naming the checkpoint if not)."""
        ckpt = check_checkpoint(self.init_from)
        check_weights_fit(f"{self.init_from} (model.init_from)", self, ckpt["state_dict"])
        return ckpt["state_dict"]

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
        # The same noise and timesteps every epoch, so val/loss moves only with the weights.
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        loss = self.diffusion_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        generator = torch.Generator().manual_seed(20_000 + batch_idx)
        loss = self.diffusion_loss(batch, generator)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        opt = self.optimizer(self.net.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": warmup_schedule(opt, self.lr_warmup_steps, total, self.lr_schedule)}

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        indices: Optional[Sequence[int]] = None,
        sampler: Optional[Sampler] = None,
        seed: Optional[int] = None,
        guidance_scale: Optional[float] = None,
    ) -> Tensor:
        """Generate images ``(B, C, *spatial)``: in [-1, 1] for pixels and min-max latents, unclipped for
        standardised latents (see :meth:`bounded`).

        Args:
            mask: ``(B, *spatial)`` integer masks to condition on (mask-guided models).
            labels: ``(B,)`` class labels (class-conditional models).
            indices: one index per sample seeding its noise (default ``0..B-1``).
            sampler: overrides the module's sampler.
            seed: overrides ``sample_seed``.
            guidance_scale: overrides the module's classifier-free guidance weight.
        """
        given = mask if mask is not None else labels
        if given is not None:
            n = given.shape[0]
        elif indices is not None:
            n = len(indices)
        else:
            raise ValueError("sample() needs masks, labels or sample indices")
        if mask is not None:
            spatial = tuple(mask.shape[1:])
        else:
            spatial = tuple(self.sample_shape) if self.sample_shape else (self.image_size, self.image_size)
        indices = list(range(n)) if indices is None else [int(i) for i in indices]
        generators = sample_generators(self.sample_seed if seed is None else seed, indices)
        batch = {k: v.to(self.device) for k, v in (("mask", mask), ("label", labels)) if v is not None}
        cond, labels = self.condition(batch)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance(w)
        if w != 1.0 and cond is None and labels is None:
            raise MedsynthError(f"guidance_scale={w} needs a mask- or class-conditional model")
        if w != 1.0 and self.label_drop_prob == 0:
            raise MedsynthError(f"guidance_scale={w} needs a model trained with model.label_drop_prob > 0 (it has "
                                "no null condition)")
        denoise = guided(self.denoise, cond, labels, self.null_condition(cond, labels), w)
        noise = initial_noise((self.image_channels, *spatial), generators, self.device)
        sampler = sampler or self.sampler
        bounded = self.bounded()
        sampler = sampler.with_settings(clip_sample=sampler.clip_sample and bounded, progress=self.progress(sampler))
        x = sampler.sample(denoise, noise, self.objective, generators)
        return x.clamp(-1, 1) if bounded else x

    def bounded(self) -> bool:
        """Whether samples live in [-1, 1] and may be clipped there: pixels and min-max scaled latents do;
        standardised latents (``latent_scaling: std``) are unbounded (issue #15)."""
        if self.latent_codec is None:
            return True
        if "method" not in self.latent_space:  # a checkpoint from before the scaling was linked: ask the manifest
            info = getattr(getattr(self._trainer, "datamodule", None), "info", None)
            return ((info or {}).get("scaling") or {}).get("method", "minmax") == "minmax"
        return self.latent_codec.bounded

    def progress(self, sampler: Optional[Sampler] = None) -> Optional[bool]:
        """The progress-bar setting of ``sampler`` (default the module's) for steps and tiles; off while a trainer
        fits or validates, so previews stay silent."""
        if self._trainer is not None and not getattr(self._trainer, "predicting", False):
            return False
        return getattr(sampler or self.sampler, "progress", None)

    # ----------------------------------------------------------------- latent space
    def decode(self, z: Tensor) -> Tensor:
        """Images/volumes in [-1, 1] from scaled latent samples ``(B, C, *latent_spatial)``."""
        return self.latent_codec.decode(z.to(self.device), progress=self.progress())

    def check_fit_inputs(self, datamodule=None) -> None:
        """Refuse, before anything is written, an ``init_from`` checkpoint whose weights do not fit and training
        shapes the net cannot denoise (e.g. a latent crop size BiFlowNet's sub-volumes do not divide); the CLI calls
        this."""
        if self.init_from is not None:
            self._read_init_from()
        shapes = getattr(datamodule, "training_shapes", None)
        if not isinstance(self.net, ChecksSpatialShape) or shapes is None:
            return
        for shape in shapes():
            try:
                self.net.check_spatial_shape(shape)
            except MedsynthError as exc:
                raise MedsynthError(f"data.crop_size: the training latents {list(shape)} do not fit the net: "
                                    f"{exc}") from None

    def check_predict_inputs(self) -> None:
        """Refuse, before anything is written, an autoencoder that does not fit and a sample shape the net cannot
        produce (the CLI calls this)."""
        if self.latent_codec is not None:
            self.latent_codec.module()
        shape = tuple(self.sample_shape) if self.sample_shape else (self.image_size, self.image_size)
        if isinstance(self.net, ChecksSpatialShape):
            self.net.check_spatial_shape(shape)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        indices = batch["index"].tolist()
        samples = self.sample(batch.get("mask"), batch.get("label"), indices=indices)
        if self.latent_space is not None:
            samples = self.decode(samples)
        out = {"sample": samples.float().cpu(), "name": list(batch["name"]), "index": indices}
        if self.output == "mask":  # a mask generator: its channels are one-hot classes
            out["generated_mask"] = samples.argmax(1).cpu()
        for key in ("mask", "label", "synthetic_mask"):
            if key in batch:
                out[key] = batch[key].cpu()
        if "image_mask" in batch and self.latent_space is not None:  # the mask at the decoded image's resolution
            out["mask"] = batch["image_mask"].cpu()
        if "folder" in batch:
            out["folder"] = list(batch["folder"])
        if "affine" in batch and "mask_path" in batch:  # conditioned on label maps: written with their geometry
            out["affine"], out["mask_path"] = batch["affine"].cpu(), list(batch["mask_path"])
        return out

    # ----------------------------------------------------------------- export
    def reference_incompatibilities(self) -> list[str]:
        """Why the segmentation-guided project's pipelines (``SegGuidedDDIMPipeline``, or diffusers' ``DDIMPipeline``
        for unconditional nets: DDIM over ``DDIMScheduler(num_train_timesteps=1000)``, epsilon, one k/255 mask
        channel, no class labels, images out) would sample an export of this model wrongly; empty if they would
        not."""
        problems = []
        if self.conditional and mask_channels(self.num_classes, self.mask_encoding) != 1:
            problems.append(f"{self.mask_encoding} masks of {mask_channels(self.num_classes, self.mask_encoding)} "
                            "channels (the reference reads one k/255 channel: train with model.mask_encoding scalar)")
        if self.objective.family != "diffusion":
            problems.append(f"a {type(self.objective).__name__} (the reference samples DDPM/DDIM)")
        else:
            config, reference = self.objective.scheduler_config(), _REFERENCE_SCHEDULE
            differ = [f"{k}={config.get(k)!r}" for k in reference if config.get(k) != reference[k]]
            if differ:
                problems.append(f"{', '.join(differ)} (the reference builds DDIMScheduler(num_train_timesteps=1000): "
                                "epsilon on 1000 linear steps)")
        if self.class_conditional:
            problems.append("class labels (the reference's labels mean something else)")
        if self.latent_space is not None:
            problems.append("autoencoder latents (the reference samples pixels)")
        if self.output != "image":
            problems.append(f"{self.output} output (the reference generates images)")
        return problems

    def export_record(self) -> dict:
        """What ``medsynth export`` records under ``medsynth`` in ``unet/config.json``: the settings the net was
        trained with, which the weights alone do not tell (``medsynth import`` reads them back)."""
        problems = self.reference_incompatibilities()
        return {
            "objective": _plugin_config(self.objective),
            "sampler": _plugin_config(self.sampler),
            "num_classes": self.num_classes,
            "mask_encoding": self.mask_encoding,
            "class_names": self.class_names,
            "label_drop_prob": self.label_drop_prob,
            "output": self.output,
            "latent_space": self.latent_space,
            "reference_pipeline": "compatible" if not problems else "INCOMPATIBLE: " + "; ".join(problems),
        }

    def export_diffusers(self, folder: str | Path) -> Path:
        """Write a diffusers pipeline folder: ``unet/`` (the net, with :meth:`export_record` in its ``config.json``,
        under ``medsynth`` when the reference pipeline samples it wrongly, which diffusers then prints whenever it
        loads the net, else under ``_medsynth``), ``scheduler/`` (the objective's noise process and prediction type: DDIM over the DDPM
        schedule, or flow-matching Euler for rectified flow) and ``model_index.json`` (``DDIMPipeline`` for unconditional
        nets, which diffusers loads and samples; ``SegGuidedDDIMPipeline`` for mask-guided ones, as the reference
        names its own folders). Each part is written whole beside its place, then swapped in.

        The caller decides whether an export the reference pipeline would sample wrongly may be written
        (:meth:`reference_incompatibilities`); such an export says so in its ``reference_pipeline`` record.
        """
        import diffusers

        if not hasattr(self.net, "save_pretrained"):
            raise MedsynthError(f"{type(self.net).__name__} cannot be exported in diffusers format")
        folder = Path(folder)
        diffusion = self.objective.family == "diffusion"
        if diffusion:
            scheduler = diffusers.DDIMScheduler(**self.objective.scheduler_config())
        else:
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**self.objective.scheduler_config(),
                                                                  shift=float(getattr(self.sampler, "shift", 1.0)))
        if not diffusion:  # no diffusers pipeline samples it: loading the whole pipeline fails instead of misleading
            pipeline = "DiffusionPipeline"
        elif self.conditional:  # as the reference saves mask-guided nets (its own class, built around unet/)
            pipeline = "SegGuidedDDIMPipeline"
        else:  # what the reference samples unconditional nets with, and diffusers loads and samples
            pipeline = "DDIMPipeline"
        index = {
            "_class_name": pipeline,
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(scheduler).__name__],
            "unet": ["diffusers", "UNet2DModel"],
        }

        def write_unet(tmp: Path) -> None:
            self.net.save_pretrained(tmp, sample_size=self.image_size)
            config = json.loads((tmp / "config.json").read_text())
            record = self.export_record()
            # diffusers drops "_" keys silently but prints any other key it does not know on every load: an export
            # the reference pipeline samples wrongly says so to whoever loads it
            config[EXPORT_RECORD_KEY if record["reference_pipeline"] != "compatible" else "_" + EXPORT_RECORD_KEY] = record
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        _replace_whole(folder / "unet", write_unet)
        _replace_whole(folder / "scheduler", lambda tmp: scheduler.save_pretrained(str(tmp)))
        _replace_whole(folder / "model_index.json",
                       lambda tmp: tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
        return folder


EXPORT_RECORD_KEY = "medsynth"
"""The key of an exported ``unet/config.json`` holding :meth:`DiffusionModule.export_record` (``_medsynth`` when the
reference pipeline samples the export correctly)."""
_REFERENCE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                       "prediction_type": "epsilon"}
"""The noise process the segmentation-guided project's pipelines assume (``DDIMScheduler(num_train_timesteps=1000)``)."""


def _plugin_config(obj) -> dict:
    """``{"class_path", "init_args"}`` of a plug-in object (objective, sampler) from its constructor's arguments,
    which these classes keep as attributes of the same name."""
    params = inspect.signature(type(obj).__init__).parameters
    init_args = {name: getattr(obj, name) for name in params if name != "self" and hasattr(obj, name)}
    return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": init_args}


def _replace_whole(final: Path, write: Callable[[Path], None]) -> None:
    """Write a file or folder through ``write(tmp)`` beside ``final``, then put it in ``final``'s place; an existing
    ``final`` (the caller checked that replacing was asked for) is moved aside first, so a kill loses neither."""
    tmp, old = final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.old")
    for leftover in (tmp, old):
        _remove(leftover)
    write(tmp)
    if final.exists():
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
