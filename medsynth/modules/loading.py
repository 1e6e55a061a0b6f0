"""Rebuilding a trained LightningModule from a medsynth checkpoint alone (for chaining stages)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser

from medsynth.errors import MedsynthError


def check_checkpoint(path: str | Path) -> None:
    """Refuse a missing, unreadable or foreign checkpoint with one line, before anything is built from it."""
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"{path}: checkpoint does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise MedsynthError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "_class_path" not in ckpt.get("hyper_parameters", {}):
        raise MedsynthError(f"{path}: not a checkpoint written by `medsynth fit` (no model config or weights)")


def checkpoint_model_config(ckpt_path: str | Path) -> tuple[str, dict]:
    """The model's ``class_path`` and ``init_args`` saved in a ``medsynth fit`` checkpoint.

    Only arguments the class takes are kept: the CLI's data links record facts (e.g. ``image_size``) in every
    checkpoint, whether or not the model uses them.
    """
    hparams = dict(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"])
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path")
    module, _, name = class_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    return class_path, {k: v for k, v in hparams.items() if k in params}


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Instantiate the module a ``medsynth fit`` checkpoint was trained as, with its (EMA) weights, in eval mode.

    The checkpoint's hyperparameters hold the resolved model config (class paths and arguments), so no config
    file is needed.

    Raises:
        MedsynthError: a missing file, or a checkpoint not written by ``medsynth fit``.
    """
    path = Path(ckpt_path)
    check_checkpoint(path)
    class_path, init_args = checkpoint_model_config(path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    cfg = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
    module = parser.instantiate_classes(cfg).model
    module.load_state_dict(torch.load(path, map_location=map_location, weights_only=True)["state_dict"])
    return module.eval()
