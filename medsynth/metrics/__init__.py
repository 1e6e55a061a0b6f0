"""Metrics on images and volumes in [-1, 1]: reconstruction quality (PSNR, SSIM, MS-SSIM)."""

from medsynth.metrics.reconstruction import ms_ssim, psnr, ssim

__all__ = ["psnr", "ssim", "ms_ssim"]
