"""Mask conditioning: how an integer label map becomes input channels, and mask ablation for training."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

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
