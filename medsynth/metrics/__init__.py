"""Metrics on images and volumes in [-1, 1]: reconstruction quality (PSNR, SSIM, MS-SSIM), realism (FID/KID with
a local feature network) and diversity (mean pairwise MS-SSIM)."""

from medsynth.metrics.distribution import (
    FeatureNet,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_similarity,
)
from medsynth.metrics.reconstruction import ms_ssim, psnr, ssim

__all__ = ["psnr", "ssim", "ms_ssim", "FeatureNet", "frechet_distance", "kernel_inception_distance",
           "mean_pairwise_similarity"]
