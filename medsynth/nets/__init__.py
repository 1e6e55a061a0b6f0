"""Plain ``nn.Module`` networks (no Lightning here)."""

from medsynth.nets.segmenter import SegUNet
from medsynth.nets.unet2d import UNet2D

__all__ = ["UNet2D", "SegUNet"]
