"""Plain ``nn.Module`` networks (no Lightning here)."""

from medsynth.nets.autoencoders import KLAutoencoder, PatchVolumeAutoencoder, VectorQuantizer
from medsynth.nets.biflownet import BiFlowNet3D
from medsynth.nets.classifier import SmallClassifier
from medsynth.nets.segmenter import SegUNet
from medsynth.nets.unet2d import UNet2D

__all__ = ["UNet2D", "SegUNet", "KLAutoencoder", "PatchVolumeAutoencoder", "VectorQuantizer", "BiFlowNet3D",
           "SmallClassifier"]
