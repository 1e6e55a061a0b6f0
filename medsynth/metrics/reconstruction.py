"""Reconstruction quality of images or volumes ``(B, C, *spatial)`` in [-1, 1], per sample.

Thin wrappers of torchmetrics' functional metrics (2D and 3D alike) that fix the data range of medsynth's
intensities (peak to peak 2) and return one value per sample, so callers decide how to average.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

DATA_RANGE = 2.0
"""Intensities live in [-1, 1]."""

MS_SSIM_MIN_SIDE = (7 - 1) * 2 ** (3 - 1) + 1
"""The smallest side :func:`ms_ssim` takes with its defaults (a 7-pixel window at 3 scales): 25."""


def psnr(pred: Tensor, target: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample ``(B,)``: ``10 log10(range^2 / MSE)``."""
    dims = tuple(range(1, pred.ndim))
    return peak_signal_noise_ratio(pred.float(), target.float(), data_range=data_range, reduction="none", dim=dims)


def ssim(pred: Tensor, target: Tensor, data_range: float = DATA_RANGE, kernel_size: int = 7) -> Tensor:
    """Structural similarity (Wang et al., 2004) per sample ``(B,)``, Gaussian window of ``kernel_size``."""
    smallest = min(pred.shape[2:])
    if smallest < kernel_size:  # tiny inputs (tests, thin slabs): the largest odd window that fits
        kernel_size = max(1, (smallest - 1) // 2 * 2 + 1)
    return structural_similarity_index_measure(pred.float(), target.float(), data_range=data_range,
                                               kernel_size=kernel_size, reduction="none")


def ms_ssim(pred: Tensor, target: Tensor, data_range: float = DATA_RANGE, kernel_size: int = 7,
            scales: int = 3) -> Tensor:
    """Multi-scale SSIM (Wang et al., 2003) per sample ``(B,)`` over ``scales`` dyadic scales.

    The smallest side must be at least ``(kernel_size - 1) * 2 ** (scales - 1)`` plus one.
    """
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    return multiscale_structural_similarity_index_measure(
        pred.float(), target.float(), data_range=data_range, kernel_size=kernel_size, betas=betas,
        reduction="none", normalize="relu",
    )


__all__ = ["psnr", "ssim", "ms_ssim"]
