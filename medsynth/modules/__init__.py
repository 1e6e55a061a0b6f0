"""LightningModules: one per kind of stage."""

from medsynth.modules.diffusion import DiffusionModule
from medsynth.modules.segmenter import SegmenterModule

__all__ = ["DiffusionModule", "SegmenterModule"]
