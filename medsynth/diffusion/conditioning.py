"""Conditioning: how an integer label map becomes input channels, mask ablation and condition drop in training,
the null condition, and classifier-free guidance at sampling."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from medsynth.errors import MedsynthError

MaskEncoding = Literal["one_hot", "scalar"]


def mask_channels(num_classes: int, encoding: MaskEncoding) -> int:
    """Input channels a mask adds: ``num_classes`` for one-hot, 1 for the scalar encoding, 0 if unconditional."""
    if num_classes == 0:
        return 0
    return num_classes if encoding == "one_hot" else 1


def encode_mask(mask: Tensor, num_classes: int, encoding: MaskEncoding = "one_hot") -> Tensor:
    """Encode an integer mask ``(B, *spatial)`` as float channels ``(B, K or 1, *spatial)``.

    Args:
        mask: class indices in ``0..num_classes-1``.
        num_classes: ``K``, counting background.
        encoding: ``one_hot``: one channel per class, 1 where the pixel has that class (scales to many classes);
            ``scalar``: one channel holding ``k / 255``, the segmentation-guided diffusion reference's encoding
            (Konz et al., MICCAI 2024), for compatibility with its checkpoints and results.
    """
    if encoding == "one_hot":
        return F.one_hot(mask.long(), num_classes).movedim(-1, 1).float()
    if encoding == "scalar":
        return (mask.float() / 255.0).unsqueeze(1)
    raise ValueError(f"unknown mask encoding {encoding!r}; expected 'one_hot' or 'scalar'")


def ablate_mask(
    mask: Tensor, num_classes: int, prob: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Mask ablation: remove each non-background class from each sample's mask with probability ``prob``.

    Removed classes become background (0), so the model learns to generate images conditioned on any subset of
    the classes (Konz et al., 2024). Draws are independent per sample and per class (the reference draws once
    per batch).

    Args:
        mask: ``(B, *spatial)`` int64 class indices.
        num_classes: ``K``, counting background.
        prob: probability in [0, 1] of removing a class.
        generator: CPU generator for the draws.

    Returns:
        The ablated mask, same shape and dtype.
    """
    if prob <= 0:
        return mask
    drop = torch.rand(mask.shape[0], num_classes, generator=generator) < prob  # (B, K)
    drop[:, 0] = False
    dropped = torch.gather(drop.to(mask.device), 1, mask.flatten(1)).view_as(mask)
    return mask.masked_fill(dropped, 0)


def null_condition(
    cond: Optional[Tensor], labels: Optional[Tensor], encoding: MaskEncoding, num_labels: int
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The null condition shaped like ``cond`` / ``labels``: all-zero one-hot channels (no class anywhere), -1 in
    the scalar encoding (below every k/255), and the extra label ``num_labels`` for class labels."""
    null_cond = torch.full_like(cond, 0.0 if encoding == "one_hot" else -1.0) if cond is not None else None
    null_labels = torch.full_like(labels, num_labels) if labels is not None else None
    return null_cond, null_labels


def drop_condition(
    cond: Optional[Tensor], labels: Optional[Tensor], null: tuple[Optional[Tensor], Optional[Tensor]], prob: float,
    generator: Optional[torch.Generator] = None,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Replace each sample's whole condition (mask channels and label together) by the null condition with
    probability ``prob``: what lets sampling use classifier-free guidance (Ho & Salimans, 2022)."""
    if prob <= 0 or (cond is None and labels is None):
        return cond, labels
    n = (cond if cond is not None else labels).shape[0]
    drop = torch.rand(n, generator=generator) < prob
    if cond is not None:
        cond = torch.where(drop.to(cond.device).view(-1, *([1] * (cond.ndim - 1))), null[0], cond)
    if labels is not None:
        labels = torch.where(drop.to(labels.device), null[1], labels)
    return cond, labels


def check_guidance(scale: float) -> None:
    """Refuse a negative classifier-free guidance weight."""
    if scale < 0:
        raise MedsynthError(f"guidance_scale={scale} must be >= 0 (1 = no guidance)")


Denoiser = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor]], Tensor]
"""``(xt, t, cond, labels) -> prediction``."""


def guided(
    denoise: Denoiser, cond: Optional[Tensor], labels: Optional[Tensor],
    null: tuple[Optional[Tensor], Optional[Tensor]], scale: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``(xt, t)`` denoiser a sampler integrates: conditional, or with classifier-free guidance
    ``uncond + scale * (cond - uncond)`` (one batched call of both) when ``scale != 1``."""
    if scale == 1.0:
        return lambda xt, t: denoise(xt, t, cond, labels)

    def both(xt: Tensor, t: Tensor) -> Tensor:
        out = denoise(torch.cat([xt, xt]), torch.cat([t, t]),
                      torch.cat([cond, null[0]]) if cond is not None else None,
                      torch.cat([labels, null[1]]) if labels is not None else None)
        conditional, unconditional = out.float().chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return both
