"""LightningModules: one per kind of stage."""

from medsynth.modules.diffusion import DiffusionModule

__all__ = ["DiffusionModule"]
