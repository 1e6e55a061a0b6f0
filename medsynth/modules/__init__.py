"""LightningModules: one per kind of stage."""

from medsynth.modules.autoencoder import AutoencoderModule
from medsynth.modules.classifier import ClassifierModule
from medsynth.modules.diffusion import DiffusionModule
from medsynth.modules.segmenter import SegmenterModule

__all__ = ["AutoencoderModule", "ClassifierModule", "DiffusionModule", "SegmenterModule"]
