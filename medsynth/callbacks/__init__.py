"""Callbacks: everything optional around training and prediction."""

from medsynth.callbacks.checkpoints import RunCheckpoint
from medsynth.callbacks.ema import EMA
from medsynth.callbacks.progressive import ProgressiveResolution
from medsynth.callbacks.reconstructions import ReconstructionLogger
from medsynth.callbacks.report import SampleReport
from medsynth.callbacks.samples import SampleGridLogger
from medsynth.writers import ReconstructionWriter, SampleWriter

__all__ = ["RunCheckpoint", "EMA", "SampleGridLogger", "SampleWriter", "ReconstructionLogger", "ReconstructionWriter",
           "ProgressiveResolution", "SampleReport"]
