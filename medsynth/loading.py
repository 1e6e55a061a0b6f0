"""Rebuilding a trained LightningModule from a medsynth checkpoint alone (for chaining stages), and the checks that
refuse a checkpoint in one line before anything is built from it."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser

from medsynth.errors import MedsynthError
from medsynth.io import load_checkpoint


def check_checkpoint(path: str | Path) -> dict:
    """Refuse a missing, unreadable or foreign checkpoint with one line, before anything is built from it.

    Returns:
        The checkpoint (memory-mapped tensors).

    Raises:
        MedsynthError: naming the file and what is wrong with it.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(ckpt.get("state_dict"), dict) or not isinstance(hparams, dict) or "_class_path" not in hparams:
        raise MedsynthError(f"{path}: not a checkpoint written by `medsynth fit` (no model config or weights)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise MedsynthError(f"{path}: its state_dict holds entries that are not named tensors (a damaged checkpoint?)")
    return ckpt


def _model_class(path: Path, class_path: object) -> type:
    """The LightningModule class a checkpoint names, or one line saying why it cannot be had."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise MedsynthError(f"{path}: its model class {class_path!r} is not a class path (a damaged checkpoint?)")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError, TypeError):
        raise MedsynthError(f"{path}: its model class {class_path} does not exist in this medsynth") from None
    if not (inspect.isclass(cls) and issubclass(cls, L.LightningModule)):
        raise MedsynthError(f"{path}: {class_path} is not a LightningModule")
    return cls


def checkpoint_model_config(ckpt_path: str | Path) -> tuple[str, dict]:
    """The model's ``class_path`` and ``init_args`` saved in a ``medsynth fit`` checkpoint.

    Only arguments the class takes are kept: the CLI's data links record facts (e.g. ``image_size``) in every
    checkpoint, whether or not the model uses them.

    Raises:
        MedsynthError: the checkpoint is unreadable or names a model class that does not exist.
    """
    path = Path(ckpt_path)
    hparams = dict(check_checkpoint(path)["hyper_parameters"])
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path")
    params = inspect.signature(_model_class(path, class_path).__init__).parameters
    return class_path, {k: v for k, v in hparams.items() if k in params}


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Instantiate the module a ``medsynth fit`` checkpoint was trained as, with its (EMA) weights, in eval mode.

    The checkpoint's hyperparameters hold the resolved model config (class paths and arguments), so no config
    file is needed.

    Raises:
        MedsynthError: a missing file, a checkpoint not written by ``medsynth fit``, a model config that no longer
            builds, or weights that do not fit the model.
    """
    path = Path(ckpt_path)
    class_path, init_args = checkpoint_model_config(path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    try:
        cfg = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
        module = parser.instantiate_classes(cfg).model
    except MedsynthError as exc:
        raise MedsynthError(f"{path}: its model config is refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - jsonargparse or the module refusing the saved arguments
        raise MedsynthError(f"{path}: its model config does not build ({' '.join(str(exc).split())[:200]})") from None
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)["state_dict"]
    check_weights_fit(path, module, state)
    module.load_state_dict(state)
    return module.eval()


def check_weights_fit(path: str | Path, module: torch.nn.Module, state: dict) -> None:
    """Refuse weights that do not fit ``module``: a missing or unexpected tensor, or one of another shape (a setting
    that shapes the net, such as the class count or the channels, differs from the one trained).

    Raises:
        MedsynthError: naming the checkpoint, the first tensor that does not fit, and both shapes.
    """
    own = module.state_dict()
    for key, value in own.items():
        saved = state.get(key)
        if saved is not None and tuple(saved.shape) != tuple(value.shape):
            raise MedsynthError(f"{path}: its weights do not fit this model: {key} is {tuple(saved.shape)} in the "
                                f"checkpoint but {tuple(value.shape)} here (a setting that shapes the net differs from "
                                "training; keep the trained settings or start a new run)")
    if getattr(module, "strict_loading", True):
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model does not"
            raise MedsynthError(f"{path}: its weights do not fit this model (the checkpoint {what}); give a "
                                "checkpoint of this architecture")


def read_init_weights(path: str | Path, module: torch.nn.Module, option: str = "model.init_from") -> dict:
    """The ``state_dict`` of the checkpoint ``path`` (a ``medsynth fit`` or ``medsynth import`` one), checked to fit
    ``module``: the weights a fine-tuning run starts from.

    Raises:
        MedsynthError: one line naming the checkpoint (and ``option``) and what does not fit.
    """
    ckpt = check_checkpoint(path)
    check_weights_fit(f"{path} ({option})", module, ckpt["state_dict"])
    return ckpt["state_dict"]
