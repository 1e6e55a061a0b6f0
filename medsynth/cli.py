"""The ``medsynth`` command: a LightningCLI with fit / validate / test / predict / export.

This is the only module that knows about the command line. Conventions it enforces:

* every run directory (``--trainer.default_root_dir``) keeps its resolved config (``config.yaml``; a resumed run
  adds ``config.1.yaml``, ...), its checkpoints under ``checkpoints/`` and its W&B files;
* Weights & Biases runs offline unless the user sets ``offline: false`` and has an API key;
* ``predict --ckpt_path`` takes the architecture (and the data's class count, channels and size) from the
  checkpoint, the data folders from the command line or else the checkpoint, and the sampler and seed from the
  command line;
* data describes itself to the model: ``num_classes``, ``channels`` and ``image_size`` are linked from the data.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from medsynth.callbacks.writers import SampleWriter, check_output_dir
from medsynth.errors import MedsynthError
from medsynth.io import atomic_write, free_path, save_json
from medsynth.modules.loading import check_checkpoint, checkpoint_model_config

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
DATA_TO_MODEL = ("num_classes", "image_channels", "image_size", "class_names", "output", "sample_shape",
                 "latent_space")
"""Model arguments a DataModule supplies through its ``model_args()`` (linked once both are instantiated)."""
TRAINING_ONLY_CALLBACKS = (ModelCheckpoint, WeightAveraging)
MODEL_DESCRIBING_DATA_ARGS = ("num_classes", "channels", "image_size", "intensity_range", "patch_size",
                              "normalization", "percentiles", "ct_window")
"""Data settings that shape the model: taken from the checkpoint when sampling or evaluating from one."""
DATA_LOCATION_ARGS = ("img_dir", "seg_dir", "manifest", "cache_dir")
PREDICT_TIME_MODEL_ARGS = ("sampler", "sample_seed", "guidance_scale", "predict_output", "latent_scaling",
                           "autoencoder", "decode_tile")
"""Model arguments that ``predict --ckpt_path`` takes from the command line/config, not from the checkpoint."""
"""Where the data lives: taken from the checkpoint only when not given on the command line."""


class MedsynthTrainer(Trainer):
    """Lightning's Trainer with medsynth's prediction output and diffusers export."""

    def predict(  # type: ignore[override]
        self,
        model: Optional[LightningModule] = None,
        dataloaders=None,
        datamodule: Optional[LightningDataModule] = None,
        return_predictions: Optional[bool] = None,
        ckpt_path: Optional[str] = None,
        output_dir: Optional[Path] = None,
        overwrite: bool = False,
        seed: Optional[int] = None,
        weights_only: Optional[bool] = None,
    ):
        """Generate samples from a checkpoint and write them under ``output_dir``.

        Args:
            model: the model to sample from.
            dataloaders: inputs (conditioning masks) instead of the datamodule's.
            datamodule: provides the predict split's masks (or the count for unconditional models).
            return_predictions: keep predictions in memory as well (off when writing to ``output_dir``).
            ckpt_path: checkpoint to sample from (``last``/``best`` or a path).
            output_dir: folder for samples, masks, grid and metadata; must be empty unless ``overwrite``.
            overwrite: allow writing into a non-empty ``output_dir`` (files of the same name are replaced).
            seed: sampling seed (overrides the model's ``sample_seed``); each sample depends only on it and its
                index.
            weights_only: passed to ``torch.load`` for the checkpoint.
        """
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)
            if seed is not None and model is not None:
                model.sample_seed = seed
            self.predict_output_dir = Path(output_dir)
            meta = {"checkpoint": str(Path(ckpt_path).resolve()) if ckpt_path and Path(ckpt_path).exists() else ckpt_path}
            writer = getattr(model, "prediction_writer", None)
            self.callbacks.append(writer(output_dir, meta) if writer else SampleWriter(output_dir, metadata=meta))
            return_predictions = bool(return_predictions)
        return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)

    def export(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        output_dir: Optional[Path] = None,
        overwrite: bool = False,
    ) -> Path:
        """Export a trained net in diffusers format (``OUTPUT_DIR/unet/config.json`` + safetensors).

        Args:
            model: the model whose net is exported.
            datamodule: unused; accepted so the training config can be reused unchanged.
            ckpt_path: checkpoint to export (EMA weights when EMA was used).
            output_dir: destination folder; must be empty unless ``overwrite``.
            overwrite: allow writing into a non-empty ``output_dir``.
        """
        if ckpt_path is None or output_dir is None:
            raise MedsynthError("export needs --ckpt_path CKPT and --output_dir DIR")
        check_checkpoint(ckpt_path)
        check_output_dir(output_dir, overwrite)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(state)
        path = model.export_diffusers(output_dir)
        print(f"exported {type(model.net).__name__} to {path}")
        return path


    def lr_find(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        min_lr: float = 1e-7,
        max_lr: float = 1e-1,
        num_training: int = 100,
    ) -> Optional[float]:
        """Learning-rate range test (Smith, 2017): train briefly with a rising learning rate and suggest one.

        Writes ``<default_root_dir>/lr_find.json`` (learning rates, losses, suggestion) and prints the suggestion;
        use it as ``--model.lr``. Nothing else is saved.

        Args:
            model: the model (its ``lr`` is what gets suggested).
            datamodule: the training data.
            min_lr: lowest learning rate tried.
            max_lr: highest learning rate tried.
            num_training: optimiser steps of the test.
        """
        from lightning.pytorch.tuner import Tuner

        finder = Tuner(self).lr_find(model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                     num_training=num_training, update_attr=False)
        if finder is None:
            return None
        suggestion = finder.suggestion()
        if self.is_global_zero:
            out = free_path(Path(self.default_root_dir) / "lr_find.json")  # an earlier test's curve is kept
            save_json(out, {"suggestion": suggestion, "lr": finder.results["lr"], "loss": finder.results["loss"]})
            if suggestion is None:
                print(f"no suggestion: the loss curve is too short or flat (raise --num_training); curve in {out}")
            else:
                print(f"suggested learning rate: {suggestion} (curve in {out}); use --model.lr {suggestion:.2e}")
        return suggestion


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config in the run folder; a resumed run gets ``config.1.yaml`` and so on, never overwrites.

    For ``predict`` with an output folder, the config goes into that folder instead.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = getattr(trainer, "predict_output_dir", None) if stage == "predict" else None
        if folder is not None:
            if trainer.is_global_zero:
                folder.mkdir(parents=True, exist_ok=True)
                text = self.parser.dump(self.config, skip_none=False)
                atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(text))
            self.already_saved = True
            return
        if stage == "predict":  # sampling without an output folder: nothing to keep
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.config_filename = trainer.strategy.broadcast(free_path(log_dir / "config.yaml").name)
        super().setup(trainer, pl_module, stage)


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _model_arg(name: str):
    def get(data):
        args = data.model_args() if hasattr(data, "model_args") else {}
        return args.get(name, MODEL_ARG_DEFAULTS[name])

    get.__name__ = f"data_{name}"
    return get


MODEL_ARG_DEFAULTS = {"num_classes": 0, "image_channels": 1, "image_size": 64, "class_names": None, "output": "image",
                      "sample_shape": None, "latent_space": None}
LATENT_SPACE_IDENTITY = ("autoencoder_sha256", "shift", "scale", "latent_channels", "downsample_factor")
"""What must agree between a latent model's checkpoint and the latents it is given (the rest, such as the output
spacing or the autoencoder's path, may change at predict)."""


def _is_subclass(class_path: Optional[str], base: type) -> bool:
    """Whether the class named by a config's ``class_path`` derives from ``base`` (False if it cannot be found)."""
    if not class_path or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module), name), base)
    except (ImportError, AttributeError, TypeError):
        return False


class MedsynthCLI(LightningCLI):
    """LightningCLI for medsynth: subclass mode for model and data, run-folder conventions, data→model links."""

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            trainer_class=MedsynthTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigCallback,
            parser_kwargs={"exit_on_error": False},  # configuration errors become one line (see main)
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}, "lr_find": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data describes itself to the model once instantiated (a class map's labels are only known after
        # reading it). Every DataModule exposes these attributes; a model without the argument is not linked.
        for name in DATA_TO_MODEL:
            parser.link_arguments("data", f"model.init_args.{name}", compute_fn=_model_arg(name), apply_on="instantiate")

    def _apply_checkpoint_data(self, sub: str, ckpt_path: str) -> None:
        """Fill the data section from the checkpoint: what the model was trained on wins, paths only if unset."""
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
        data = self.config[sub].get("data")
        if not saved or data is None:
            return
        init = data["init_args"]
        _, model_args = checkpoint_model_config(ckpt_path)
        for k in MODEL_DESCRIBING_DATA_ARGS:  # also across data classes (e.g. the 3D demo's model on user volumes)
            if k == "num_classes" and "num_classes" not in model_args:
                continue  # a model blind to masks (an autoencoder) leaves the class count to the command line
            if k in saved and k in init:
                init[k] = saved[k]
        if saved.get("_class_path") != data.get("class_path"):
            return
        for k in DATA_LOCATION_ARGS:
            if k in saved and k in init and init.get(k) is None:
                init[k] = saved[k]

    def _apply_checkpoint_model(self, sub: str, ckpt_path: str) -> None:
        """The model config saved in the checkpoint replaces the command line's (as LightningCLI does), keeping
        only arguments the model class takes: data links record facts a model may not use (e.g. image_size)."""
        class_path, init_args = checkpoint_model_config(ckpt_path)
        self.config = self.parser.parse_object(
            {sub: {"model": {"class_path": class_path, "init_args": init_args}}}, self.config
        )

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        keep = {}
        if sub == "predict":
            model = self.config[sub].get("model")
            init = model.get("init_args") if model is not None else None
            if init is not None:
                keep = {k: init.get(k) for k in PREDICT_TIME_MODEL_ARGS if k in init}
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in ("last", "best"):
            check_checkpoint(ckpt_path)
        if sub in ("predict", "validate", "test", "export") and ckpt_path and Path(ckpt_path).is_file():
            self._apply_checkpoint_data(sub, ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file():
            self._apply_checkpoint_model(sub, ckpt_path)
        for k, v in keep.items():
            self.config[sub]["model"]["init_args"][k] = v

    def _check_checkpoint_matches_data(self) -> None:
        """Refuse data that describes another model than the checkpoint holds (one line instead of a state-dict
        size mismatch)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        current = getattr(self.model, "hparams", {})
        takes = inspect.signature(type(self.model).__init__).parameters
        for name in DATA_TO_MODEL:
            if name == "sample_shape" or name not in takes:  # output size may change; facts the model ignores
                continue
            if name == "latent_space" and saved.get(name) and current.get(name):
                a, b = ({k: d.get(k) for k in LATENT_SPACE_IDENTITY} for d in (saved[name], current[name]))
                if a != b:
                    raise MedsynthError(f"{ckpt_path}: the model was trained on latents of another encoding "
                                        f"(autoencoder or scaling differ: {a} vs {b})")
                continue
            if name in saved and name in current and saved[name] != current[name]:
                raise MedsynthError(
                    f"{ckpt_path}: the model was trained with {name}={saved[name]!r} but the data gives "
                    f"{current[name]!r}"
                )

    def before_fit(self) -> None:
        # Inputs a model reads only when training starts (e.g. a stage-1 checkpoint) are checked before anything
        # is written, so a bad one leaves no run folder behind.
        check = getattr(self.model, "check_fit_inputs", None)
        if check is not None:
            check(self.datamodule)

    def before_predict(self) -> None:
        self._check_checkpoint_matches_data()
        check = getattr(self.model, "check_predict_inputs", None)
        if check is not None:
            check()
        # the resolved config travels into metadata.json, beside the samples it produced
        self.trainer.run_config = yaml.safe_load(self._parser("predict").dump(self.config["predict"], skip_none=False))

    def before_validate(self) -> None:
        self._check_checkpoint_matches_data()

    def before_test(self) -> None:
        self._check_checkpoint_matches_data()

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        trainer = cfg["trainer"]
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        trainer["default_root_dir"] = str(root)
        if sub in ("predict", "export", "lr_find"):  # nothing worth logging; do not open a W&B run for it
            trainer["logger"] = False
        loggers = trainer.get("logger")
        for lg in loggers if isinstance(loggers, list) else [loggers]:
            if not hasattr(lg, "get") or lg.get("class_path") != WANDB_LOGGER:
                continue
            init = lg["init_args"]
            if init.get("save_dir") in (None, ".", ""):
                init["save_dir"] = str(root)
            if sub != "fit":
                init["offline"] = True
            elif not init.get("offline", False) and not _wandb_key_available():
                warnings.warn("W&B online logging was asked for but no API key is set (WANDB_API_KEY or "
                              "~/.netrc): logging offline instead; `wandb sync` uploads the run later", stacklevel=2)
                init["offline"] = True
        callbacks = [cb for cb in trainer.get("callbacks") or [] if hasattr(cb, "get")]
        if sub != "fit":  # checkpointing and weight averaging only act while fitting; elsewhere they only warn
            callbacks = [cb for cb in callbacks if not _is_subclass(cb.get("class_path"), TRAINING_ONLY_CALLBACKS)]
            trainer["callbacks"] = callbacks
        for cb in callbacks:
            if _is_subclass(cb.get("class_path"), ModelCheckpoint) and cb["init_args"].get("dirpath") is None:
                cb["init_args"]["dirpath"] = str(root / "checkpoints")


FLAGS = ("--overwrite",)
"""Boolean options that may be given bare, as switches (``--overwrite`` means ``--overwrite=true``)."""


def expand_flags(args: list[str]) -> list[str]:
    """Turn bare switches from :data:`FLAGS` into ``--flag=true`` (jsonargparse wants a value for booleans)."""
    out = []
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        bare = nxt is None or nxt.startswith("--") or nxt.lower() not in ("true", "false", "yes", "no", "1", "0")
        out.append(f"{a}=true" if a in FLAGS and bare else a)
    return out


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``medsynth`` command; ``args`` replaces ``sys.argv[1:]`` (tests).

    A problem with the user's input (data, configuration, checkpoint, output folder) is printed as one line,
    ``medsynth: error: ...``, with exit status 2; ``--debug`` shows the traceback instead.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    from_command_line = args is None
    args = expand_flags(list(sys.argv[1:] if args is None else args))
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if from_command_line:  # LightningCLI (and DDP's relaunch) read sys.argv
        sys.argv[1:] = args
    try:
        MedsynthCLI(args=None if from_command_line else args)
    except Exception as exc:
        user_error = _find_user_error(exc)
        if user_error is None or debug:
            raise
        print(f"medsynth: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _one_line(message: str) -> str:
    """A jsonargparse error on one line, without its union-type boilerplate."""
    text = " ".join(message.split())
    text = re.sub(r" ?Does not validate against any of the Union subtypes Subtypes: \[.*?\] Errors: -", "", text)
    text = re.sub(r" - Expected a <class 'NoneType'>.*$", "", text)
    return re.sub(r" Given value type: .*$", "", text)


def _find_user_error(exc: BaseException) -> Optional[str]:
    """The one-line message of the user error behind ``exc``: a :class:`MedsynthError` (jsonargparse wraps those
    raised while instantiating), a configuration error from the parser, or a Trainer setting Lightning refuses for
    the model; ``None`` for anything else (a bug)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedsynthError):
            return str(exc)
        if isinstance(exc, (ArgumentError, argparse.ArgumentError)):
            return "configuration: " + _one_line(str(exc))
        if isinstance(exc, MisconfigurationException):  # Lightning refusing a Trainer setting for this model
            return "configuration: " + _one_line(str(exc))
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    main()
