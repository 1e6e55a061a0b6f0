"""The ``medsynth`` command: a LightningCLI with fit / validate / test / predict / export.

This is the only module that knows about the command line. Conventions it enforces:

* every run directory (``--trainer.default_root_dir``) keeps its resolved config (``config.yaml``; a resumed run
  adds ``config.1.yaml``, ...), its checkpoints under ``checkpoints/`` and its W&B files;
* Weights & Biases runs offline unless the user sets ``offline: false`` and has an API key;
* ``predict --ckpt_path`` takes the architecture (and the data's class count, channels and size) from the
  checkpoint, the data folders from the command line or else the checkpoint, and the sampler and seed from the
  command line (from an imported checkpoint: the sampling settings it records, unless the command line sets them);
* data describes itself to the model: ``num_classes``, ``channels`` and ``image_size`` are linked from the data;
  what data cannot tell alone (a latent datamodule without a manifest, sampling an imported model) it leaves to the
  model's own values (:class:`~medsynth.contracts.FromModel`);
* nothing is written before every input has been checked (:meth:`MedsynthCLI._preflight`): options (typed
  constraints, then the classes' own checks), the stage's data files, the checkpoint against the model and data;
  ``predict``/``validate``/``test``/``export`` refuse to run without trained weights; ``--ckpt_path last|best``
  resolve to a file; a fit into a folder holding a run's checkpoints needs ``--ckpt_path``;
* a refusal is one line on stderr (``medsynth: error: ...``, exit status 2; ``--debug`` shows the traceback):
  Lightning's announcements are held back until the run starts (:class:`HeldOutput`);
* output folders are claimed atomically and marked ``INCOMPLETE`` until their results are whole.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Callable, Optional

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from medsynth.contracts import (
    ChecksFitInputs,
    ChecksPredictInputs,
    ChecksSpatialShape,
    DescribesData,
    FromModel,
    WritesPredictions,
)
from medsynth.convert import CONVERTERS, ImportOptions, import_checkpoint
from medsynth.convert.export import export_diffusers, reference_incompatibilities
from medsynth.errors import MedsynthError
from medsynth.io import (
    abandon_output_dir,
    atomic_write,
    claim_output_dir,
    free_path,
    release_output_dir,
    save_json,
    write_error,
)
from medsynth.loading import check_checkpoint, check_weights_fit, checkpoint_model_config
from medsynth.modules.checks import check_denoiser_shape
from medsynth.modules.diffusion import DiffusionModule
from medsynth.writers import SampleWriter

log = logging.getLogger("medsynth.cli")

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
DATA_TO_MODEL = ("num_classes", "image_channels", "image_size", "class_names", "output", "sample_shape",
                 "latent_space")
"""Model arguments a DataModule supplies through its ``model_args()`` (linked once both are instantiated)."""
TRAINING_ONLY_CALLBACKS = (ModelCheckpoint, WeightAveraging)
NEEDS_WEIGHTS = ("predict", "validate", "test", "export")
"""Subcommands that use trained weights: they refuse to run without ``--ckpt_path`` (never an untrained model)."""
STAGES = {"fit": "fit", "lr_find": "fit", "validate": "validate", "test": "test", "predict": "predict"}
"""The DataModule stage each subcommand sets up (and checks) before the Trainer writes anything."""


class HeldOutput:
    """Holds back what Lightning and Python announce (seed, accelerator, tips, warnings) while a run's inputs are
    checked: a refused run prints only its one-line error, a run that passes prints them when it starts.

    Lightning's loggers (and medsynth's) get a collecting handler and ``warnings.showwarning`` a collecting function
    until :meth:`release` (replays everything, in order, to the usual places) or :meth:`discard`.
    """

    LOGGERS = ("lightning.pytorch", "lightning.fabric", "medsynth")

    def __init__(self) -> None:
        self.records: list = []
        self._saved: Optional[dict] = None
        self._showwarning = None

    def hold(self) -> "HeldOutput":
        if self._saved is not None:
            return self
        records = self.records

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(("log", record))

        self._saved = {}
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [Collect()], False
        self._showwarning = warnings.showwarning
        # warnings already being recorded (warnings.catch_warnings(record=True), as pytest does) go on to the recorder
        recording = getattr(getattr(warnings, "_showwarnmsg_impl", None), "__name__", "") != "_showwarnmsg_impl"
        if not recording:

            def showwarning(message, category, filename, lineno, file=None, line=None):
                records.append(("warning", (message, category, filename, lineno, file, line)))

            warnings.showwarning = showwarning
        return self

    def _restore(self) -> None:
        if self._saved is None:
            return
        for name, (handlers, propagate) in self._saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        warnings.showwarning = self._showwarning
        self._saved = None

    def release(self) -> None:
        """Stop holding and print what was held, as it would have been printed."""
        held = self._saved is not None
        self._restore()
        records, self.records[:] = list(self.records), []
        if not held:
            return
        for kind, item in records:
            if kind == "log":
                logging.getLogger(item.name).handle(item)
            else:
                warnings.showwarning(*item)

    def discard(self) -> None:
        """Stop holding and drop what was held (a refused run)."""
        self._restore()
        self.records.clear()


class ReleaseHeldOutput(Callback):
    """Prints the held announcements when the run actually starts (its inputs have passed every check)."""

    def __init__(self, held: HeldOutput) -> None:
        self.held = held

    def on_fit_start(self, trainer, pl_module) -> None:
        self.held.release()

    on_validation_start = on_test_start = on_predict_start = on_sanity_check_start = on_fit_start


class LogDataSettings(Callback):
    """Logs the datamodule's settings under ``data`` when a run starts. Datamodules keep them out of Lightning's
    own hyper-parameter logging (``save_hyperparameters(logger=False)``), which merges model and data settings
    into one flat dict and stops the run on a name the two hold with different values, although the same name
    can mean two things: a mask generator's ``data.num_classes`` is its model's output channels, its model's
    ``num_classes`` 0; ``data.num_classes: null`` counts the classes the model is built with."""

    def on_fit_start(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        if data is not None:
            for logger in trainer.loggers:
                logger.log_hyperparams({"data": {k: v for k, v in data.hparams.items() if k != "_class_path"}})


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _MedsynthFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"medsynth: {record.levelname.lower()}: {record.getMessage()}"


def _setup_medsynth_logging() -> None:
    """medsynth's own notices (e.g. settings a resumed checkpoint overrides) as ``medsynth: warning: ...`` lines."""
    logger = logging.getLogger("medsynth")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_MedsynthFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
        run_config: Optional[dict] = None,
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
            run_config: the resolved config, recorded beside the predictions (given by the CLI, not an option).
        """
        if output_dir is None:
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        if seed is not None and model is not None:
            model.sample_seed = seed
        meta = {"checkpoint": str(Path(ckpt_path).resolve()) if ckpt_path and Path(ckpt_path).exists() else ckpt_path}
        writer = (model.prediction_writer(output_dir, meta, run_config) if isinstance(model, WritesPredictions)
                  else SampleWriter(output_dir, metadata=meta, config=run_config))
        self.callbacks.append(writer)
        # one process claims the folder (DDP's other ranks start after the claim and write into it)
        claim = claim_output_dir(output_dir, overwrite, "medsynth predict") if rank_zero_only.rank == 0 else None
        try:
            result = super().predict(model, dataloaders, datamodule, bool(return_predictions), ckpt_path, weights_only)
        except BaseException:
            if claim is not None:
                abandon_output_dir(claim)  # nothing written yet: undone; else the INCOMPLETE marker stays
            raise
        if claim is not None:
            release_output_dir(output_dir)
        return result

    def export(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        output_dir: Optional[Path] = None,
        overwrite: bool = False,
        allow_incompatible: bool = False,
    ) -> Path:
        """Export a trained net as a diffusers pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``).

        Args:
            model: the model whose net is exported (a diffusion model's).
            datamodule: unused; accepted so the training config can be reused unchanged.
            ckpt_path: checkpoint to export (EMA weights when EMA was used).
            output_dir: destination folder; must be empty unless ``overwrite``.
            overwrite: allow writing into a non-empty ``output_dir``.
            allow_incompatible: export a model the segmentation-guided project's pipeline would sample wrongly
                (one-hot masks, another objective or schedule, class labels, latents, mask output); without it such
                an export is refused. Its ``unet/config.json`` then says so (``medsynth.reference_pipeline``).
        """
        if ckpt_path is None or output_dir is None:
            raise MedsynthError("export needs --ckpt_path CKPT and --output_dir DIR")
        state = check_checkpoint(ckpt_path)["state_dict"]
        check_exportable(model, ckpt_path)
        check_weights_fit(ckpt_path, model, state)
        problems = check_export_compatible(model, ckpt_path, allow_incompatible)
        claim = claim_output_dir(output_dir, overwrite, "medsynth export")
        try:
            model.load_state_dict(state)
            path = export_diffusers(model, output_dir)
        except BaseException:
            abandon_output_dir(claim)
            raise
        release_output_dir(output_dir)
        print(f"exported {type(model.net).__name__} to {path} (unet/, scheduler/, model_index.json)")
        if problems:
            log.warning(f"{path}: the segmentation-guided reference pipeline samples this export wrongly "
                        f"({'; '.join(problems)}); unet/config.json records it under 'medsynth'")
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


def check_export_compatible(model: LightningModule, ckpt_path, allow_incompatible: bool) -> list[str]:
    """Refuse an export the segmentation-guided reference pipeline would sample wrongly, unless allowed.

    Returns:
        Why the reference pipeline would sample it wrongly (empty when it would not).

    Raises:
        MedsynthError: naming the checkpoint, the reasons and ``--allow_incompatible``.
    """
    problems = reference_incompatibilities(model)
    if problems and not allow_incompatible:
        raise MedsynthError(f"{ckpt_path}: the segmentation-guided reference pipeline would sample this export "
                            f"wrongly ({'; '.join(problems)}); export anyway with --allow_incompatible (the export "
                            "then records this in unet/config.json)")
    return problems


def check_exportable(model: LightningModule, ckpt_path) -> None:
    """Refuse to export a model that has no diffusers form (an autoencoder, a segmenter, a classifier).

    Raises:
        MedsynthError: naming the checkpoint and what it holds.
    """
    net = getattr(model, "net", None)
    if not isinstance(model, DiffusionModule) or not callable(getattr(net, "save_pretrained", None)):
        raise MedsynthError(f"{ckpt_path}: holds a {type(model).__name__} with a {type(net).__name__}; export writes "
                            "diffusion UNets in diffusers format (give a DiffusionModule checkpoint with a UNet2D)")


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config in the run folder; a resumed run gets ``config.1.yaml`` and so on, never overwrites.

    For ``predict`` with an output folder (``--output_dir``, in the config it saves), the config goes into that
    folder instead.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        output_dir = self.config.get("output_dir") if stage == "predict" else None
        folder = Path(output_dir) if output_dir is not None else None
        if folder is not None:
            if trainer.is_global_zero:
                folder.mkdir(parents=True, exist_ok=True)
                text = self.parser.dump(self.config, skip_none=False)
                atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            self.already_saved = True
            return
        if stage == "predict":  # sampling without an output folder: nothing to keep
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.config_filename = trainer.strategy.broadcast(free_path(log_dir / "config.yaml").name)
        try:
            super().setup(trainer, pl_module, stage)
        except OSError as exc:
            raise write_error(log_dir / self.config_filename, exc) from None


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _builtin(value):
    """``value`` with jsonargparse's constrained numbers (``PositiveInt`` ...) turned into plain ``int``/``float``:
    linked values land in checkpoints, which must load with ``torch.load(weights_only=True)``."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {k: _builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_builtin(v) for v in value) if type(value) in (list, tuple) else [_builtin(v) for v in value]
    return value


def _model_arg(name: str, configured: Optional[Callable[[str], object]] = None):
    """The link's ``compute_fn`` for the model argument ``name``: what the data says (:data:`MODEL_ARG_DEFAULTS` if
    it says nothing), or, for an entry the data takes from the model (:class:`~medsynth.contracts.FromModel`), the
    model's own configured value (``configured(name)``: the checkpoint's, config's or command line's), or what
    the entry's ``adopt`` makes of them."""

    def get(data):
        args = data.model_args() if isinstance(data, DescribesData) else {}
        value = args.get(name, MODEL_ARG_DEFAULTS[name])
        if isinstance(value, FromModel):
            model = {n: configured(n) if configured is not None else None for n in DATA_TO_MODEL}
            value = model[name] if value.adopt is None else value.adopt(model)
        return _builtin(value)

    get.__name__ = f"data_{name}"
    return get


MODEL_ARG_DEFAULTS = {"num_classes": 0, "image_channels": 1, "image_size": 64, "class_names": None, "output": "image",
                      "sample_shape": None, "latent_space": None}
LATENT_SPACE_IDENTITY = ("autoencoder_sha256", "shift", "scale", "latent_channels", "downsample_factor")
"""What must agree between a latent model's checkpoint and the latents it is given (the rest, such as the output
spacing or the autoencoder's path, may change at predict)."""


def _plain(value):
    """A config value as plain data (jsonargparse namespaces become dicts) for comparing."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_writable(folder: Path, option: str) -> None:
    """Refuse a run folder that cannot be created or written (before anything is tried there)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MedsynthError(f"{folder}: {existing} is not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MedsynthError(f"{folder}: cannot write in {existing} (permission denied); choose another {option}")


class _SetUpOnce:
    """A DataModule's ``setup`` that skips the stage already set up (picklable, for spawned processes)."""

    def __init__(self, setup, done: str) -> None:
        self.setup, self.done = setup, done

    def __call__(self, stage: str) -> None:
        if stage != self.done:
            self.setup(stage)


def _set_up_early(datamodule: LightningDataModule, stage: str) -> None:
    """Set up (build and check every file of) the DataModule's ``stage`` now, before the Trainer writes anything;
    Lightning's own ``setup`` call for that stage then does nothing."""
    datamodule.setup(stage)
    datamodule.setup = _SetUpOnce(datamodule.setup, stage)


def _class_of(class_path: Optional[str]) -> Optional[type]:
    """The class a config's ``class_path`` names (``None`` if it cannot be found)."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if inspect.isclass(cls) else None


def _set_by_the_run(class_path: Optional[str], args: dict) -> dict:
    """The entries of ``args`` (a model's predict-time arguments) that the command line or a config sets, i.e. that
    differ from the class's defaults. An imported checkpoint records how its source samples (3D MedDiffusion's
    1000 DDPM steps and decoding chunks): those stand unless the run sets others."""
    cls = _class_of(class_path)
    if cls is None:
        return args
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in args.items()
            if k not in params or params[k].default is inspect.Parameter.empty
            or _plain(v) != _plain(params[k].default)}


def _declared_classes(model_class: Optional[type], name: str) -> tuple[type, ...]:
    """The classes the annotation of ``model_class``'s argument ``name`` names (``Optional[Sampler]``: Sampler)."""
    try:
        hint = typing.get_type_hints(model_class.__init__).get(name)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: nothing declared
        return ()
    return tuple(a for a in (typing.get_args(hint) or (hint,)) if inspect.isclass(a))


def _options_onto(saved, given, declared: tuple[type, ...]):
    """A predict-time plug-in as the run gives it: ``given``, or, when ``given`` names no class of its own (only
    options such as ``--model.sampler.init_args.num_inference_steps 4``, which jsonargparse resolves to the
    argument's declared base class), the checkpoint's plug-in ``saved`` with the options that differ from the base
    class's defaults."""
    if not (hasattr(saved, "get") and hasattr(given, "get") and saved.get("class_path") and given.get("class_path")):
        return given
    base, own = _class_of(given["class_path"]), _class_of(saved["class_path"])
    if base is None or own is None or base is own or base not in declared or not issubclass(own, base):
        return given
    defaults = inspect.signature(base.__init__).parameters
    for name, value in _plain(given.get("init_args") or {}).items():
        if name in defaults and _plain(defaults[name].default) != value:
            saved["init_args"][name] = value
    return saved


def _is_subclass(class_path: Optional[str], base: type) -> bool:
    """Whether the class named by a config's ``class_path`` derives from ``base`` (False if it cannot be found)."""
    cls = _class_of(class_path)
    return cls is not None and issubclass(cls, base)


class MedsynthCLI(LightningCLI):
    """LightningCLI for medsynth: subclass mode for model and data, run-folder conventions, data→model links."""

    def __init__(self, args=None, run: bool = True, held: Optional[HeldOutput] = None) -> None:
        self.held = held or HeldOutput()
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
        # run_config is predict's argument the CLI gives itself (see _prepare_subcommand_kwargs), not an option
        return {**LightningCLI.subcommands(), "predict": {*LightningCLI.subcommands()["predict"], "run_config"},
                "export": {"model", "datamodule"}, "lr_find": {"model", "datamodule"}}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "predict":  # the resolved config travels into metadata.json, beside the samples it produced
            kwargs["run_config"] = yaml.safe_load(self._parser("predict").dump(self.config["predict"], skip_none=False))
        return kwargs

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `medsynth import` is run by main() before this parser is built; it is listed so that --help shows it
        listed = LightningArgumentParser(description=IMPORT_HELP + " (medsynth import --help)")
        parser._subcommands_action.add_subcommand("import", listed, help=IMPORT_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data describes itself to the model once instantiated (a class map's labels are only known after
        # reading it). Every DataModule exposes these attributes; a model without the argument is not linked.
        for name in DATA_TO_MODEL:
            parser.link_arguments("data", f"model.init_args.{name}", compute_fn=_model_arg(name, self._configured),
                                  apply_on="instantiate")

    def _configured(self, name: str):
        """The model argument ``name`` as configured before the data's link (the checkpoint's when sampling from
        one), as plain data; ``None`` when not set."""
        config = getattr(self, "config", None)
        if config is None:
            return None
        sub = config.get("subcommand")
        model = (config[sub] if sub else config).get("model")
        init = model.get("init_args") if model is not None else None
        return _plain(init.get(name)) if init is not None else None

    def _apply_checkpoint_data(self, sub: str, ckpt_path: str) -> None:
        """Fill the data section from the checkpoint: what the model was trained on wins, paths only if unset.

        Which arguments are which, the datamodule class declares (:class:`~medsynth.contracts.DeclaresDataArgs`:
        ``model_describing_args``, ``data_location_args``); a class that declares none takes nothing."""
        ckpt = check_checkpoint(ckpt_path)
        saved = ckpt.get("datamodule_hyper_parameters") or {}
        saved = dict(saved) if isinstance(saved, dict) else {}
        data = self.config[sub].get("data")
        if not saved or data is None:
            return
        init = data["init_args"]
        data_class = _class_of(data.get("class_path"))
        _, model_args = checkpoint_model_config(ckpt_path)
        replaced = []
        # also across data classes (e.g. the 3D demo's model on user volumes)
        for k in getattr(data_class, "model_describing_args", ()):
            if k == "num_classes" and "num_classes" not in model_args:
                continue  # a model blind to masks (an autoencoder) leaves the class count to the command line
            if k in saved and k in init:
                if init[k] is not None and _plain(init[k]) != _plain(saved[k]):
                    replaced.append(f"data.{k}={_short(_plain(init[k]))} (checkpoint: {_short(_plain(saved[k]))})")
                init[k] = saved[k]
        if replaced:  # never silently
            log.warning(f"{sub} uses the data settings the model was trained with ({ckpt_path}); not applied: "
                        + ", ".join(replaced))
        if saved.get("_class_path") != data.get("class_path"):
            return
        for k in getattr(data_class, "data_location_args", ()):
            if k in saved and k in init and init.get(k) is None:
                init[k] = saved[k]

    def _apply_checkpoint_model(self, sub: str, ckpt_path: str) -> None:
        """The model config saved in the checkpoint replaces the command line's (as LightningCLI does), keeping
        only arguments the model class takes: data links record facts a model may not use (e.g. image_size)."""
        class_path, init_args = checkpoint_model_config(ckpt_path)
        try:
            self.config = self.parser.parse_object(
                {sub: {"model": {"class_path": class_path, "init_args": init_args}}}, self.config
            )
        except (ArgumentError, argparse.ArgumentError, MedsynthError) as exc:
            raise MedsynthError(f"{ckpt_path}: its saved model config is refused ({_one_line(str(exc))})") from None

    def _checkpoint_dirs(self, sub: str) -> list[Path]:
        """The folders the run's checkpoint callbacks write to (``RUN/checkpoints`` unless configured)."""
        trainer = self.config[sub]["trainer"]
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        dirs = []
        for cb in trainer.get("callbacks") or []:
            if hasattr(cb, "get") and _is_subclass(cb.get("class_path"), ModelCheckpoint):
                dirpath = (cb.get("init_args") or {}).get("dirpath")
                dirs.append(Path(dirpath) if dirpath else root / "checkpoints")
        return list(dict.fromkeys(dirs)) or [root / "checkpoints"]

    def _resolve_named_checkpoint(self, sub: str, name: str) -> str:
        """The file ``--ckpt_path last`` or ``best`` stands for in the run folder (``--trainer.default_root_dir``):
        ``last.ckpt``, or the best checkpoint its checkpoint state records."""
        dirs = self._checkpoint_dirs(sub)
        last = next((d / "last.ckpt" for d in dirs if (d / "last.ckpt").is_file()), None)
        if last is None:
            raise MedsynthError(f"--ckpt_path {name}: no checkpoint {dirs[0] / 'last.ckpt'}; give "
                                "--trainer.default_root_dir RUN of a run, or the checkpoint file itself")
        if name == "last":
            return str(last)
        states = (check_checkpoint(last).get("callbacks") or {}).values()
        for state in sorted((s for s in states if isinstance(s, dict)), key=lambda s: not s.get("monitor")):
            recorded = state.get("best_model_path")
            if state.get("monitor") and isinstance(recorded, str) and recorded:
                for candidate in (Path(recorded), last.parent / Path(recorded).name):  # the run may have moved
                    if candidate.is_file():
                        return str(candidate)
        raise MedsynthError(f"--ckpt_path best: {last} records no best checkpoint that still exists (none monitored "
                            "a metric?); give the checkpoint file")

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        keep = {}
        if sub == "predict":
            model = self.config[sub].get("model")
            init = model.get("init_args") if model is not None else None
            if init is not None:  # what the model class declares a choice of each sampling run (DeclaresPredictArgs)
                names = getattr(_class_of(model.get("class_path")), "predict_time_args", ())
                keep = {k: init[k] for k in names if init.get(k) is not None}  # unset: the checkpoint's
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path in ("last", "best"):
            ckpt_path = self._resolve_named_checkpoint(sub, ckpt_path)
            self.config[sub]["ckpt_path"] = ckpt_path  # the file itself goes into metadata, with its SHA-256
        if not ckpt_path:
            return
        if "medsynth_import" in check_checkpoint(ckpt_path):
            keep = _set_by_the_run(self.config[sub]["model"].get("class_path"), keep)
        if sub in ("predict", "validate", "test", "export"):
            self._apply_checkpoint_data(sub, ckpt_path)
        given = _plain((self.config[sub].get("model") or {}).get("init_args") or {})
        self._apply_checkpoint_model(sub, ckpt_path)
        model_class = _class_of(self.config[sub]["model"].get("class_path"))
        for k, v in keep.items():
            saved = self.config[sub]["model"]["init_args"].get(k)
            self.config[sub]["model"]["init_args"][k] = _options_onto(saved, v, _declared_classes(model_class, k))
        self._report_overridden(sub, ckpt_path, given)

    def _report_overridden(self, sub: str, ckpt_path: str, given: dict) -> None:
        """Say which model settings of the command line/config the checkpoint's replace (never silently)."""
        used = _plain(self.config[sub]["model"].get("init_args") or {})
        def same(a, b) -> bool:
            return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

        differ = [k for k in given if k in used and k not in DATA_TO_MODEL and not same(given[k], used[k])]
        if differ:
            what = "a resumed run keeps" if sub == "fit" else f"{sub} uses"
            shown = ", ".join(f"model.{k}={_short(given[k])} (checkpoint: {_short(used[k])})" for k in differ[:4])
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            log.warning(f"{what} the model settings saved in {ckpt_path}; not applied: {shown}{more}")

    def _check_checkpoint_matches_data(self) -> None:
        """Refuse data that describes another model than the checkpoint holds, and weights that do not fit the model
        built (one line instead of a state-dict size mismatch)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = check_checkpoint(ckpt_path)
        saved = ckpt.get("hyper_parameters", {})
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
        check_weights_fit(ckpt_path, self.model, ckpt["state_dict"])

    def _refuse_existing_run(self) -> None:
        """A fit without ``--ckpt_path`` into a folder that already holds a run's checkpoints would mix two runs."""
        for cb in self.trainer.checkpoint_callbacks:
            folder = Path(cb.dirpath) if getattr(cb, "dirpath", None) else None
            if folder is not None and folder.is_dir() and any(folder.glob("*.ckpt")):
                raise MedsynthError(f"{folder}: already holds the checkpoints of a run; resume it with --ckpt_path "
                                    f"{folder / 'last.ckpt'}, or give another --trainer.default_root_dir")

    def _preflight(self) -> None:
        """Everything that can be checked before the Trainer writes (run folder, ``config.yaml``, output folder):
        trained weights for the subcommands that use them, the run folder, the checkpoint against the model and data,
        every file of the stage's data, and the model's own checks. Then the run starts and Lightning's
        announcements are printed."""
        sub = self.subcommand
        ckpt_path = self.config[sub].get("ckpt_path")
        if sub in NEEDS_WEIGHTS and not ckpt_path:
            raise MedsynthError(f"{sub} needs trained weights: --ckpt_path RUN/checkpoints/last.ckpt (or last/best "
                                "with --trainer.default_root_dir RUN); an untrained model is never used")
        if sub in ("fit", "lr_find"):
            _check_writable(Path(self.trainer.default_root_dir), "--trainer.default_root_dir")
        if sub == "fit" and not ckpt_path:
            self._refuse_existing_run()
        if sub == "export":
            check_exportable(self.model, ckpt_path)
            check_export_compatible(self.model, ckpt_path, bool(self.config[sub].get("allow_incompatible")))
        if ckpt_path:
            self._check_checkpoint_matches_data()
        stage = STAGES.get(sub)
        if stage is not None and self.datamodule is not None:
            _set_up_early(self.datamodule, stage)
        if stage == "fit":
            # inputs a model reads only when training starts (e.g. a stage-1 checkpoint), shapes the net cannot take
            if isinstance(self.model, ChecksFitInputs):
                self.model.check_fit_inputs(self.datamodule)
        if stage == "predict" and isinstance(self.model, ChecksPredictInputs):
            self.model.check_predict_inputs()
        if stage in ("fit", "predict"):
            self._check_net_shapes(stage)
        self.trainer.callbacks.append(ReleaseHeldOutput(self.held))
        if self.trainer.loggers and self.datamodule is not None:
            self.trainer.callbacks.append(LogDataSettings())

    def _check_net_shapes(self, stage: str) -> None:
        """A diffusion model's net must take the shapes it will be given (e.g. an image side its downsampling
        divides); nets that check their own shapes (``check_spatial_shape``) are left to the model's checks."""
        model = self.model
        if not hasattr(model, "denoise") or isinstance(getattr(model, "net", None), ChecksSpatialShape):
            return
        shapes = getattr(self.datamodule, "training_shapes", None) if stage == "fit" else None
        if shapes is not None:
            for shape in shapes():
                check_denoiser_shape(model, shape, f"data.crop_size={shape[0]}")
            return
        sample_shape = getattr(model, "sample_shape", None)
        if sample_shape:
            check_denoiser_shape(model, sample_shape, f"sample shape {list(sample_shape)}")
        else:
            size = int(model.image_size)
            check_denoiser_shape(model, (size, size), f"data.image_size={size}")

    def before_fit(self) -> None:
        self._preflight()

    def before_lr_find(self) -> None:
        self._preflight()

    def before_predict(self) -> None:
        self._preflight()

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()

    def before_export(self) -> None:
        self._preflight()
        self.held.release()

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


FLAGS = ("--overwrite", "--allow_incompatible")
"""Boolean options that may be given bare, as switches (``--overwrite`` means ``--overwrite=true``)."""


def expand_flags(args: list[str]) -> list[str]:
    """Turn bare switches from :data:`FLAGS` into ``--flag=true`` (jsonargparse wants a value for booleans)."""
    out = []
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        bare = nxt is None or nxt.startswith("--") or nxt.lower() not in ("true", "false", "yes", "no", "1", "0")
        out.append(f"{a}=true" if a in FLAGS and bare else a)
    return out


def classes_from_checkpoint(args: list[str]) -> list[str]:
    """``medsynth predict|test|validate|export --ckpt_path FILE`` without any ``--config``, ``--model`` or ``--data``:
    the model and data classes the checkpoint was trained (or imported) with, as ``--model`` / ``--data`` flags,
    so a checkpoint alone is enough. Any other command line is returned unchanged.

    Raises:
        MedsynthError: the checkpoint cannot be read (one line naming it).
    """
    if not args or args[0] not in NEEDS_WEIGHTS:
        return args
    given = {a.split("=", 1)[0] for a in args[1:]}
    if given & {"--config", "-c", "--model", "--data"}:
        return args
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
    if ckpt is None and "--ckpt_path" in args[:-1]:
        ckpt = args[args.index("--ckpt_path") + 1]
    if ckpt is None or not Path(ckpt).is_file():
        return args  # no file to read the classes from (`last`/`best` need the run's config)
    checkpoint = check_checkpoint(ckpt)
    data = (checkpoint.get("datamodule_hyper_parameters") or {}).get("_class_path")
    return [args[0], "--model", checkpoint["hyper_parameters"]["_class_path"],
            *(["--data", data] if isinstance(data, str) else []), *args[1:]]


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
    _setup_medsynth_logging()
    held = HeldOutput()
    if not debug:  # Lightning's announcements wait until the inputs have passed their checks
        held.hold()
    try:
        if args and args[0] == "import":  # converts a file; no model, data or trainer to configure
            import_command(args[1:])
        else:
            filled = classes_from_checkpoint(args)
            if from_command_line:
                sys.argv[1:] = filled
            MedsynthCLI(args=None if from_command_line else filled, held=held)
    except Exception as exc:
        user_error = _find_user_error(exc)
        if user_error is None or debug:
            held.release()
            raise
        held.discard()
        print(f"medsynth: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        held.release()
        raise
    held.release()


class _ImportParser(argparse.ArgumentParser):
    """``medsynth import``'s options; a mistake in them is a one-line user error like any other."""

    def error(self, message: str):
        raise MedsynthError(f"import: {message}")


IMPORT_HELP = "Convert a checkpoint of another project (its format detected) into a medsynth checkpoint."


def import_command(args: list[str]) -> Path:
    """``medsynth import``: convert a checkpoint of another project into a medsynth checkpoint.

    The format is detected (or given with ``--format``); only what the source does not record is asked for.
    The result is read by ``predict --ckpt_path`` and ``fit --model.init_from`` like a checkpoint ``fit`` wrote.
    """
    parser = _ImportParser(
        prog="medsynth import", exit_on_error=False,
        description=IMPORT_HELP + " Sample it with `medsynth predict --ckpt_path OUT.ckpt`, fine-tune it with "
                    "`medsynth fit --model.init_from OUT.ckpt`.")
    parser.add_argument("--source", type=Path, required=True, help="the checkpoint file or model folder to convert")
    parser.add_argument("--output", type=Path, required=True, help="the medsynth checkpoint to write (never replaced)")
    parser.add_argument("--num_classes", type=int, help="mask classes counting background, when the source does not "
                        "record them (a segmentation-guided UNet with a mask channel)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="which weights of a source holding both (default: ema)")
    parser.add_argument("--autoencoder", type=Path, help="a medsynth autoencoder checkpoint (itself imported) that a "
                        "latent diffusion model decodes with")
    parser.add_argument("--format", choices=[c.name for c in CONVERTERS], help="the source's format (default: "
                        "detected)")
    ns = parser.parse_args(args)
    options = ImportOptions(num_classes=ns.num_classes, weights=ns.weights, autoencoder=ns.autoencoder)
    path, imported, format = import_checkpoint(ns.source, ns.output, options, ns.format)
    print(f"imported {ns.source} ({format}) as {imported.model['class_path'].rsplit('.', 1)[-1]} into {path}")
    for note in imported.notes:
        print(f"note: {note}")
    data = "" if imported.data else " --data DATA_CLASS"  # without recorded data settings the data class is asked for
    print(f"sample:    medsynth predict --ckpt_path {path}{data} --output_dir DIR ...")
    print(f"fine-tune: medsynth fit --config CONFIG --model.init_from {path} ... (CONFIG with the same net; see "
          "docs/coming-from.md)")
    return path


def _one_line(message: str) -> str:
    """A jsonargparse error on one line, without its union-type boilerplate."""
    text = " ".join(message.split())
    text = re.sub(r" ?Does not validate against any of the Union subtypes Subtypes: \[.*?\] Errors: -", "", text)
    text = re.sub(r" - Expected a <class 'NoneType'>.*$", "", text)
    nested = re.compile("Parser key \"([\\w.]+)\": Problem with given class_path '[^']*': Parser key \"([\\w.]+)\"")
    while nested.search(text):  # Parser key "data": ... class_path '...': Parser key "batch_size" -> "data.batch_size"
        text = nested.sub(r'Parser key "\1.\2"', text)
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
