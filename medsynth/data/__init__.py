"""Data: discovery, validation, datasets and datamodules."""

from medsynth.data.classes import ClassImageDataModule
from medsynth.data.datamodules import SegGuidedImageDataModule
from medsynth.data.demo import MNI152PlaneDataModule, MNI152SliceDataModule, MNI152VolumeDataModule
from medsynth.data.latent_manifest import read_latent_manifest
from medsynth.data.latents import LatentDataModule
from medsynth.data.masks import GeneratedMaskDataModule, MaskDataModule
from medsynth.data.samples import SampleDirDataModule
from medsynth.data.volumes import Normalization, VolumeDataModule, VolumeRecord, check_volume, read_volume_manifest

__all__ = ["SegGuidedImageDataModule", "ClassImageDataModule", "MaskDataModule", "GeneratedMaskDataModule",
           "SampleDirDataModule", "MNI152SliceDataModule", "MNI152PlaneDataModule", "VolumeDataModule",
           "MNI152VolumeDataModule", "VolumeRecord", "Normalization", "read_volume_manifest", "check_volume",
           "LatentDataModule", "read_latent_manifest"]
