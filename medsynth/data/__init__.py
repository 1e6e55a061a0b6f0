"""Data: discovery, validation, datasets and datamodules."""

from medsynth.data.datamodules import SegGuidedImageDataModule
from medsynth.data.demo import MNI152SliceDataModule

__all__ = ["SegGuidedImageDataModule", "MNI152SliceDataModule"]
