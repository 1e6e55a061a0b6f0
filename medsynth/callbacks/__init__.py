"""Callbacks: everything optional around training and prediction."""

from medsynth.callbacks.checkpoints import RunCheckpoint
from medsynth.callbacks.samples import SampleGridLogger
from medsynth.callbacks.writers import SampleWriter

__all__ = ["RunCheckpoint", "SampleGridLogger", "SampleWriter"]
