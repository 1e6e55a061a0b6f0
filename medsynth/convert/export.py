"""``medsynth export``: a diffusion model as a diffusers pipeline folder, and what the segmentation-guided
project's pipelines could not sample from it."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import diffusers

from medsynth.diffusion.conditioning import mask_channels
from medsynth.errors import MedsynthError
from medsynth.modules.diffusion import DiffusionModule

EXPORT_RECORD_KEY = "medsynth"
"""The key of an exported ``unet/config.json`` holding :func:`export_record` (``_medsynth`` when the
reference pipeline samples the export correctly)."""
REFERENCE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                       "prediction_type": "epsilon"}
"""The noise process the segmentation-guided project's pipelines assume (``DDIMScheduler(num_train_timesteps=1000)``)."""


def reference_incompatibilities(model: DiffusionModule) -> list[str]:
    """Why the segmentation-guided project's pipelines (``SegGuidedDDIMPipeline``, or diffusers' ``DDIMPipeline``
    for unconditional nets: DDIM over ``DDIMScheduler(num_train_timesteps=1000)``, epsilon, one k/255 mask
    channel, no class labels, images out) would sample an export of this model wrongly; empty if they would
    not."""
    problems = []
    if model.conditional and model.mask_encoding == "patch_embedding":
        problems.append("patch-embedded masks (the embedding is not part of the UNet)")
    elif model.conditional and mask_channels(model.num_classes, model.mask_encoding) != 1:
        problems.append(f"{model.mask_encoding} masks of {mask_channels(model.num_classes, model.mask_encoding)} "
                        "channels (the reference reads one k/255 channel: train with model.mask_encoding scalar)")
    if model.objective.family != "diffusion":
        problems.append(f"a {type(model.objective).__name__} (the reference samples DDPM/DDIM)")
    else:
        config, reference = model.objective.scheduler_config(), REFERENCE_SCHEDULE
        differ = [f"{k}={config.get(k)!r}" for k in reference if config.get(k) != reference[k]]
        if differ:
            problems.append(f"{', '.join(differ)} (the reference builds DDIMScheduler(num_train_timesteps=1000): "
                            "epsilon on 1000 linear steps)")
    if model.class_conditional:
        problems.append("class labels (the reference's labels mean something else)")
    if model.latent_space is not None:
        problems.append("autoencoder latents (the reference samples pixels)")
    if model.output != "image":
        problems.append(f"{model.output} output (the reference generates images)")
    return problems

def export_record(model: DiffusionModule) -> dict:
    """What ``medsynth export`` records under ``medsynth`` in ``unet/config.json``: the settings the net was
    trained with, which the weights alone do not tell (``medsynth import`` reads them back)."""
    problems = reference_incompatibilities(model)
    return {
        "objective": _plugin_config(model.objective),
        "sampler": _plugin_config(model.sampler),
        "num_classes": model.num_classes,
        "mask_encoding": model.mask_encoding,
        "class_names": model.class_names,
        "label_drop_prob": model.label_drop_prob,
        "output": model.output,
        "latent_space": model.latent_space,
        "reference_pipeline": "compatible" if not problems else "INCOMPATIBLE: " + "; ".join(problems),
    }

def export_diffusers(model: DiffusionModule, folder: str | Path) -> Path:
    """Write a diffusers pipeline folder: ``unet/`` (the net, with :func:`export_record` in its ``config.json``,
    under ``medsynth`` when the reference pipeline samples it wrongly, which diffusers then prints whenever it
    loads the net, else under ``_medsynth``), ``scheduler/`` (the objective's noise process and prediction type: DDIM over the DDPM
    schedule, or flow-matching Euler for rectified flow) and ``model_index.json`` (``DDIMPipeline`` for unconditional
    nets, which diffusers loads and samples; ``SegGuidedDDIMPipeline`` for mask-guided ones, as the reference
    names its own folders). Each part is written whole beside its place, then swapped in.

    The caller decides whether an export the reference pipeline would sample wrongly may be written
    (:func:`reference_incompatibilities`); such an export says so in its ``reference_pipeline`` record.
    """

    if not hasattr(model.net, "save_pretrained"):
        raise MedsynthError(f"{type(model.net).__name__} cannot be exported in diffusers format")
    if getattr(model, "mask_embedding", None) is not None:
        raise MedsynthError("a model with patch-embedded masks (model.mask_encoding patch_embedding) cannot be "
                            "exported in diffusers format: the embedding is not part of the UNet")
    folder = Path(folder)
    diffusion = model.objective.family == "diffusion"
    if diffusion:
        scheduler = diffusers.DDIMScheduler(**model.objective.scheduler_config())
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**model.objective.scheduler_config(),
                                                              shift=float(getattr(model.sampler, "shift", 1.0)))
    if not diffusion:  # no diffusers pipeline samples it: loading the whole pipeline fails instead of misleading
        pipeline = "DiffusionPipeline"
    elif model.conditional:  # as the reference saves mask-guided nets (its own class, built around unet/)
        pipeline = "SegGuidedDDIMPipeline"
    else:  # what the reference samples unconditional nets with, and diffusers loads and samples
        pipeline = "DDIMPipeline"
    index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", "UNet2DModel"],
    }

    def write_unet(tmp: Path) -> None:
        model.net.save_pretrained(tmp, sample_size=model.image_size)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        record = export_record(model)
        # diffusers drops "_" keys silently but prints any other key it does not know on every load: an export
        # the reference pipeline samples wrongly says so to whoever loads it
        config[EXPORT_RECORD_KEY if record["reference_pipeline"] != "compatible" else "_" + EXPORT_RECORD_KEY] = record
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    _replace_whole(folder / "unet", write_unet)
    _replace_whole(folder / "scheduler", lambda tmp: scheduler.save_pretrained(str(tmp)))
    _replace_whole(folder / "model_index.json",
                   lambda tmp: tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
    return folder


def _plugin_config(obj) -> dict:
    """``{"class_path", "init_args"}`` of a plug-in object (objective, sampler) from its constructor's arguments,
    which these classes keep as attributes of the same name."""
    params = inspect.signature(type(obj).__init__).parameters
    init_args = {name: getattr(obj, name) for name in params if name != "self" and hasattr(obj, name)}
    return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": init_args}


def _replace_whole(final: Path, write: Callable[[Path], None]) -> None:
    """Write a file or folder through ``write(tmp)`` beside ``final``, then put it in ``final``'s place; an existing
    ``final`` (the caller checked that replacing was asked for) is moved aside first, so a kill loses neither."""
    tmp, old = final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.old")
    for leftover in (tmp, old):
        _remove(leftover)
    write(tmp)
    if final.exists():
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
