"""Generation: how a :class:`~medsynth.modules.DiffusionModule` samples, decodes latents and answers ``predict``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from medsynth.contracts import ChecksSpatialShape
from medsynth.diffusion.conditioning import AUTO_GUIDANCE, check_guidance, guided
from medsynth.diffusion.samplers import Sampler, initial_noise, sample_generators
from medsynth.errors import MedsynthError


class Generation:
    """The sampling half of :class:`~medsynth.modules.DiffusionModule` (a mixin: it uses the module's net,
    objective, sampler, conditioning and latent codec): the one sampling path shared by ``predict``, preview
    grids and scoring, with per-sample seeds, classifier-free guidance, clipping where the data are bounded,
    progress bars in ``predict`` only, and decoding of latent samples.
    """

    @torch.no_grad()
    def sample(
        self,
        mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        indices: Optional[Sequence[int]] = None,
        sampler: Optional[Sampler] = None,
        seed: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        full_mask: Optional[Tensor] = None,
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
            full_mask: ``(B, *spatial * factor)`` the masks at image resolution, for latent models with
                ``mask_encoding: patch_embedding``.
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
        inputs = (("mask", mask), ("label", labels), ("full_mask", full_mask))
        batch = {k: v.to(self.device) for k, v in inputs if v is not None}
        cond, labels = self.condition(batch)
        w = self.guidance_weight(guidance_scale)
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

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance applies: a mask- or class-conditional model trained with condition drop
        (``label_drop_prob > 0``), so it has learned the null condition."""
        return bool((self.conditional or self.class_conditional) and self.label_drop_prob > 0)

    def guidance_weight(self, guidance_scale=None) -> float:
        """The guidance weight sampling uses: ``guidance_scale`` (default the module's); ``auto`` is
        :data:`~medsynth.diffusion.conditioning.AUTO_GUIDANCE` for a :attr:`guidable` model and 1 otherwise."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance(w)
        if w == "auto":
            return AUTO_GUIDANCE if self.guidable else 1.0
        return float(w)

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

    def decode(self, z: Tensor) -> Tensor:
        """Images/volumes in [-1, 1] from scaled latent samples ``(B, C, *latent_spatial)``."""
        return self.latent_codec.decode(z.to(self.device), progress=self.progress())

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
        samples = self.sample(batch.get("mask"), batch.get("label"), indices=indices, full_mask=batch.get("full_mask"))
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
