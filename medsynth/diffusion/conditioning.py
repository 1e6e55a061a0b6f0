"""Conditioning: how an integer label map becomes input channels, mask ablation and condition drop in training,
the null condition, and classifier-free guidance at sampling."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.errors import MedsynthError

MaskEncoding = Literal["one_hot", "patch_embedding", "scalar"]


def mask_channels(num_classes: int, encoding: MaskEncoding, embedding_channels: int = 0) -> int:
    """Input channels a mask adds to the net's: ``num_classes`` for one-hot, ``embedding_channels`` for the patch
    embedding, 1 for the scalar encoding, 0 if unconditional."""
    if num_classes == 0:
        return 0
    return {"one_hot": num_classes, "patch_embedding": embedding_channels}.get(encoding, 1)


def encode_mask(mask: Tensor, num_classes: int, encoding: MaskEncoding = "one_hot") -> Tensor:
    """Encode an integer mask ``(B, *spatial)`` as float channels ``(B, K or 1, *spatial)``.

    Args:
        mask: class indices in ``0..num_classes-1``.
        num_classes: ``K``, counting background.
        encoding: ``one_hot``: one channel per class, 1 where the pixel has that class (scales to many classes);
            ``patch_embedding``: the same one-hot channels, which the module then embeds
            (:class:`MaskPatchEmbedding`); ``scalar``: one channel holding ``k / 255``, the segmentation-guided
            diffusion reference's encoding (Konz et al., MICCAI 2024), for compatibility with its checkpoints and
            results.
    """
    if encoding in ("one_hot", "patch_embedding"):
        return F.one_hot(mask.long(), num_classes).movedim(-1, 1).float()
    if encoding == "scalar":
        return (mask.float() / 255.0).unsqueeze(1)
    raise ValueError(f"unknown mask encoding {encoding!r}; expected 'one_hot', 'patch_embedding' or 'scalar'")


class MaskPatchEmbedding(nn.Module):
    """A learned patch embedding of one-hot masks at image resolution onto a latent grid: a convolution with
    kernel = stride = the autoencoder's downsampling factor, ``(B, K, *spatial * factor)`` to
    ``(B, channels, *spatial)`` (ViT's patch embedding; MAISI embeds its ControlNet's label maps alike).

    A latent voxel encodes a block of ``factor ** d`` image voxels: a mask reduced to the latent grid keeps one
    label per block (at 4x on 2 mm voxels the grey-matter ribbon mostly vanishes), where the embedding sees every
    label boundary inside the block, at the cost of one small convolution.

    Args:
        num_classes: ``K``, the one-hot channels in.
        channels: embedding channels out (the net's extra input channels).
        factor: image voxels per latent voxel along each axis (1: a per-voxel linear map, in pixel space).
        spatial_dims: 2 or 3.
    """

    def __init__(self, num_classes: int, channels: int, factor: int, spatial_dims: int) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.factor = int(factor)
        self.proj = conv(num_classes, channels, kernel_size=self.factor, stride=self.factor)

    def forward(self, one_hot: Tensor) -> Tensor:
        if any(s % self.factor for s in one_hot.shape[2:]):
            raise MedsynthError(f"a mask of spatial shape {list(one_hot.shape[2:])} does not divide into the "
                                f"latent grid's blocks of {self.factor} voxels")
        return self.proj(one_hot)


def batch_mask_channels(batch: dict, num_classes: int, encoding: MaskEncoding, block: int = 1,
                        ablation_prob: float = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """A batch's mask encoded (:func:`encode_mask`) after mask ablation with ``ablation_prob`` (training):
    ``batch["mask"]`` on the net's grid, or ``batch["full_mask"]`` at image resolution for ``patch_embedding``
    in latent space (``block > 1``: the autoencoder's factor).

    Raises:
        MedsynthError: the batch lacks the mask the encoding needs.
    """
    blocks = encoding == "patch_embedding" and block > 1
    mask = batch.get("full_mask" if blocks else "mask")
    if mask is None:
        raise MedsynthError("this model is mask-guided (num_classes > 0) but the data gives no masks"
                            + (" at image resolution (full_mask)" if blocks else ""))
    mask = ablate_mask(mask, num_classes, ablation_prob, generator)
    return encode_mask(mask, num_classes, encoding)


def reduce_to_grid(mask: Tensor, block: int) -> Tensor:
    """An integer mask ``(*spatial * block)`` reduced to the coarse grid ``(*spatial)`` by majority: each coarse
    voxel takes the most frequent label of its block (ties: the lower label), so the coarse mask stays centred on
    its image voxels (nearest-neighbour resizing takes each block's first voxel, shifting the mask by
    ``(block - 1) / 2`` voxels)."""
    if block == 1:
        return mask
    one_hot = F.one_hot(mask.long()[None]).movedim(-1, 1).float()  # (1, K, *spatial * block)
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[mask.ndim]
    return pool(one_hot, block)[0].argmax(0)


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
    null_cond = torch.full_like(cond, -1.0 if encoding == "scalar" else 0.0) if cond is not None else None
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


AUTO_GUIDANCE = 2.0
"""The classifier-free guidance weight ``guidance_scale: auto`` uses for a model that can be guided (conditional and
trained with condition drop): the measured choice of docs/benchmarks.md, "Classifier-free guidance by default"
(class-conditional BiFlowNets: 0.88 of the ceiling at 2 against 0.50 / 0.56 unguided; 2D class models: 0.75 -> 1.01
after 100 steps, no loss of within-class variety; label-map-guided BiFlowNets: level with unguided, 3 worse)."""


def check_guidance(scale) -> None:
    """Refuse a negative classifier-free guidance weight, or a word other than ``auto``."""
    if isinstance(scale, str):
        if scale != "auto":
            raise MedsynthError(f"guidance_scale={scale!r} must be a number >= 0 or 'auto'")
        return
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
