"""Data: discovery, validation, datasets and datamodules."""

from medsynth.data.classes import ClassImageDataModule
from medsynth.data.datamodules import SegGuidedImageDataModule
from medsynth.data.demo import MNI152PlaneDataModule, MNI152SliceDataModule
from medsynth.data.masks import GeneratedMaskDataModule, MaskDataModule
from medsynth.data.samples import SampleDirDataModule

__all__ = ["SegGuidedImageDataModule", "ClassImageDataModule", "MaskDataModule", "GeneratedMaskDataModule",
           "SampleDirDataModule", "MNI152SliceDataModule", "MNI152PlaneDataModule"]
