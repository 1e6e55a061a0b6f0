"""Losses that are more than one line: adversarial (GAN phase) and perceptual (local weights only)."""

from medsynth.losses.adversarial import AdversarialLoss
from medsynth.losses.perceptual import PerceptualLoss

__all__ = ["AdversarialLoss", "PerceptualLoss"]
