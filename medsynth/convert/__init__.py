"""Bringing checkpoints of other projects into medsynth (``medsynth import``).

A converter reads one foreign format and returns what a ``medsynth fit`` checkpoint holds: the LightningModule's
config (``class_path`` + ``init_args``, as LightningCLI saves it), its ``state_dict`` (the weights to sample with,
e.g. the EMA copy) and, where the source records them, the data settings the model was trained with. The
``import`` subcommand picks the converter whose ``detect`` accepts the source and writes the checkpoint, so that
``medsynth predict --ckpt_path OUT.ckpt`` samples and ``medsynth fit --model.init_from OUT.ckpt`` fine-tunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Protocol

from torch import Tensor


@dataclass(frozen=True)
class ImportOptions:
    """What ``medsynth import`` asks of the user when the source does not record it."""

    num_classes: Optional[int] = None
    """Mask classes with background (mask-guided) or number of class labels, when the source does not say."""
    weights: Literal["ema", "model"] = "ema"
    """Which weights of a source that holds both to import."""
    autoencoder: Optional[Path] = None
    """A medsynth autoencoder checkpoint (itself imported) that a latent diffusion model decodes with."""


@dataclass
class Imported:
    """A converted model, in the terms of a ``medsynth fit`` checkpoint."""

    model: dict
    """``{"class_path": "medsynth.modules.X", "init_args": {...}}``: the module's config, nested plug-ins as
    ``class_path``/``init_args`` dicts, exactly as ``medsynth fit --print_config`` shows a model."""
    state_dict: dict[str, Tensor]
    """The LightningModule's ``state_dict`` (keys as ``module.state_dict()`` names them)."""
    data: Optional[dict] = None
    """``{"class_path": ..., "init_args": {...}}`` of the data settings the source was trained with, if known."""
    notes: list[str] = field(default_factory=list)
    """What the converter assumed or could not carry over, reported to the user."""


class Converter(Protocol):
    """One foreign checkpoint format."""

    name: str
    """The format's name in messages and in ``--format``."""

    def detect(self, source: Path) -> bool:
        """Whether ``source`` (a file or folder) is in this format; never raises on foreign input."""

    def convert(self, source: Path, options: ImportOptions) -> Imported:
        """The medsynth model held by ``source``.

        Raises:
            MedsynthError: one line naming the file and what is missing or wrong.
        """
