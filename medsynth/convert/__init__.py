"""Bringing checkpoints of other projects into medsynth (``medsynth import``).

A converter reads one foreign format and returns what a ``medsynth fit`` checkpoint holds: the LightningModule's
config (``class_path`` + ``init_args``, as LightningCLI saves it), its ``state_dict`` (the weights to sample with,
e.g. the EMA copy) and, where the source records them, the data settings the model was trained with. The
``import`` subcommand picks the converter whose ``detect`` accepts the source and writes the checkpoint, so that
``medsynth predict --ckpt_path OUT.ckpt`` samples and ``medsynth fit --model.init_from OUT.ckpt`` fine-tunes.

The formats known are the converter objects listed in :data:`CONVERTERS` (one entry per format; a new format is one
module exposing ``CONVERTERS = [...]`` and one line there).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Protocol, Sequence

import lightning
import torch
from torch import Tensor

from medsynth.errors import MedsynthError
from medsynth.io import write_error
from medsynth.loading import load_module


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


def find_converter(source: Path, format: Optional[str] = None,
                   converters: Optional[Sequence[Converter]] = None) -> Converter:
    """The converter for ``source``: the one named ``format``, else the first whose ``detect`` accepts it.

    Raises:
        MedsynthError: the source does not exist, ``format`` names no converter, or no converter recognises it.
    """
    converters = CONVERTERS if converters is None else converters
    names = ", ".join(c.name for c in converters)
    source = Path(source)
    if not source.exists():
        raise MedsynthError(f"{source}: --source does not exist")
    if format is not None:
        for converter in converters:
            if converter.name == format:
                return converter
        raise MedsynthError(f"--format {format}: unknown format; known: {names}")
    for converter in converters:
        if converter.detect(source):
            return converter
    raise MedsynthError(f"{source}: not a checkpoint format medsynth can import (known: {names}); give the "
                        "checkpoint file or model folder itself, or --format NAME")


def checkpoint_from(imported: Imported, source: Path, format: str) -> dict:
    """The checkpoint dict of an imported model, laid out as ``medsynth fit`` writes it (what
    :func:`~medsynth.loading.check_checkpoint` and ``predict --ckpt_path`` read), plus a
    ``medsynth_import`` record of where it came from."""
    model = imported.model
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in imported.state_dict.items()},
        "hyper_parameters": {"_class_path": model["class_path"], **_plain(model.get("init_args") or {})},
        "medsynth_import": {"source": str(Path(source).resolve()), "format": format, "notes": list(imported.notes)},
    }
    if imported.data:
        ckpt["datamodule_hyper_parameters"] = {"_class_path": imported.data["class_path"],
                                               **_plain(imported.data.get("init_args") or {})}
    return ckpt


def _plain(value):
    """Config values as the builtin types ``torch.load(weights_only=True)`` accepts (paths become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def import_checkpoint(source: str | Path, output: str | Path, options: Optional[ImportOptions] = None,
                      format: Optional[str] = None, converters: Optional[Sequence[Converter]] = None
                      ) -> tuple[Path, Imported, str]:
    """Convert ``source`` into the medsynth checkpoint ``output``.

    The result is built back into its LightningModule with the weights loaded before it is kept, so a checkpoint
    that would not sample is never written. It appears whole (written beside ``output``, then linked into place)
    and never replaces an existing file.

    Returns:
        ``output``, the converted model, and the name of the format it was read as.

    Raises:
        MedsynthError: ``output`` exists, the source is unknown, or the converter refuses it (one line).
    """
    source, output, options = Path(source), Path(output), options or ImportOptions()
    if output.exists() or output.is_symlink():
        raise MedsynthError(f"{output}: already exists; medsynth import never replaces a file: choose another --output")
    converter = find_converter(source, format, converters)
    imported = converter.convert(source, options)
    ckpt = checkpoint_from(imported, source, converter.name)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(output, exc) from None
    try:
        torch.save(ckpt, tmp)
        try:
            load_module(tmp)
        except MedsynthError as exc:  # a converter bug, not the user's: say which converter and what failed
            raise MedsynthError(f"{source}: read as {converter.name}, but the result does not build in medsynth "
                                f"({str(exc).replace(tmp, 'the converted checkpoint')})") from None
        os.chmod(tmp, 0o644)
        exists = MedsynthError(f"{output}: already exists; medsynth import never replaces a file: choose another "
                               "--output")
        try:
            os.link(tmp, output)  # fails if output appeared meanwhile: never replaced
        except FileExistsError:
            raise exists from None
        except OSError:  # a file system without hard links: rename, after one more look
            if output.exists():
                raise exists from None
            os.replace(tmp, output)
    except OSError as exc:
        raise write_error(output, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output, imported, converter.name


from medsynth.convert import diffusers_unet, meddiffusion  # noqa: E402 - the converters implement the contract above

CONVERTERS: list[Converter] = [*diffusers_unet.CONVERTERS, *meddiffusion.CONVERTERS]
"""Every format ``medsynth import`` knows, tried in this order by :func:`find_converter`."""
