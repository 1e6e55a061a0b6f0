"""Conditioning: how a :class:`~medsynth.modules.DiffusionModule` turns a batch's masks and labels into its net's
input (mask channels, patch-embedded or not, and class labels), with ablation and condition drop in training."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from medsynth.diffusion.conditioning import batch_mask_channels, drop_condition, null_condition
from medsynth.errors import MedsynthError


class Conditioned:
    """The conditioning half of :class:`~medsynth.modules.DiffusionModule` (a mixin: it uses the module's
    ``num_classes``, ``class_names``, ``mask_encoding``, ``mask_block``, ``mask_embedding``,
    ``mask_ablation_prob``, ``label_drop_prob`` and ``net``)."""

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
            cond = batch_mask_channels(batch, self.num_classes, self.mask_encoding, self.mask_block,
                                       self.mask_ablation_prob if train else 0.0, generator)
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
        x = self.net_input(xt, cond)
        return self.net(x, t) if labels is None else self.net(x, t, class_labels=labels)

    def net_input(self, xt: Tensor, cond: Optional[Tensor]) -> Tensor:
        """The noised image with the mask channels ``cond`` (patch-embedded for ``patch_embedding``) appended."""
        if cond is not None and self.mask_embedding is not None:
            cond = self.mask_embedding(cond.to(self.mask_embedding.proj.weight.dtype))
        x = xt if cond is None else torch.cat([xt, cond.to(xt.dtype)], dim=1)
        return x.contiguous(memory_format=channels_last_format(x.ndim)) if getattr(self, "channels_last", False) else x


def channels_last_format(ndim: int) -> torch.memory_format:
    """The channels-last memory order for tensors of ``ndim`` dimensions (4: 2D images, 5: volumes)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last
