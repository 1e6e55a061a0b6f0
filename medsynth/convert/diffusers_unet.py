"""Importing a diffusers ``UNet2DModel`` folder: the segmentation-guided diffusion project's checkpoints (Konz et al.,
MICCAI 2024, mazurowski-lab/segmentation-guided-diffusion) and ``medsynth export`` folders.

The segmentation-guided project saves its model as a diffusers pipeline folder (``unet/config.json`` + weights,
``scheduler/``, ``model_index.json``; its published checkpoints are the ``unet/`` part alone). Its nets see the
image with the mask concatenated as ONE channel holding ``k / 255`` (medsynth's ``mask_encoding: scalar``), were
trained with epsilon prediction on 1000 linear DDPM steps, and are sampled with DDIM, 50 steps, eta 0. The class
count is in no file it writes, so a mask-guided one needs ``--num_classes K``.

A ``medsynth export`` folder records its model's settings under ``medsynth`` (or ``_medsynth``) in
``unet/config.json``; those are used as they are (one-hot masks, other objectives), so export and import round-trip.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import UNet2DModel

from medsynth.convert import Imported, ImportOptions
from medsynth.convert.export import EXPORT_RECORD_KEY, REFERENCE_SCHEDULE
from medsynth.errors import MedsynthError
from medsynth.io import read_json
from medsynth.nets.unet2d import UNet2D

UNET_CLASS = "UNet2DModel"
REFERENCE_OBJECTIVE = {"class_path": "medsynth.diffusion.DDPMObjective", "init_args": dict(REFERENCE_SCHEDULE)}
"""The segmentation-guided project's noise process: ``DDPMScheduler(num_train_timesteps=1000)`` / DDIM alike."""
REFERENCE_SAMPLER = {"class_path": "medsynth.diffusion.DDIMSampler",
                     "init_args": {"num_inference_steps": 50, "eta": 0.0}}
"""How the segmentation-guided project samples (``SegGuidedDDIMPipeline`` defaults)."""
IGNORED_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "in_channels",
                       "out_channels", EXPORT_RECORD_KEY}
"""``config.json`` entries that do not shape the net, or that the import sets from elsewhere."""


def _unet_folder(source: Path) -> Path:
    """The folder holding ``config.json``: ``source/unet`` of a pipeline folder, or ``source`` itself."""
    return source / "unet" if (source / "unet" / "config.json").is_file() else source


def _read_config(path: Path) -> dict:
    config = read_json(path, "UNet config")
    if not isinstance(config, dict):
        raise MedsynthError(f"{path}: not a diffusers model config (holds a {type(config).__name__})")
    return config


class DiffusersUNetConverter:
    """A diffusers ``UNet2DModel`` folder (``unet/config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``), as the segmentation-guided diffusion project and ``medsynth export`` save it, or a bare ``unet``
    folder such as the project's published checkpoints."""

    name = "diffusers-unet2d"

    def detect(self, source: Path) -> bool:
        try:
            config = json.loads((_unet_folder(Path(source)) / "config.json").read_text(encoding="utf-8"))
            return isinstance(config, dict) and config.get("_class_name") == UNET_CLASS
        except (OSError, ValueError):
            return False

    def convert(self, source: Path, options: ImportOptions) -> Imported:
        source = Path(source)
        folder = _unet_folder(source)
        config_path = folder / "config.json"
        config = _read_config(config_path)
        if config.get("_class_name") != UNET_CLASS:
            raise MedsynthError(f"{config_path}: a {config.get('_class_name')!r}, not a diffusers {UNET_CLASS}")
        notes: list[str] = []
        records = [config.get(k) for k in (EXPORT_RECORD_KEY, "_" + EXPORT_RECORD_KEY) if isinstance(config.get(k), dict)]
        exported = records[0] if records else None
        image_channels = int(config.get("out_channels", 3))
        mask_channels = int(config.get("in_channels", 3)) - image_channels
        if exported is not None:
            settings = self._exported_settings(config_path, exported, mask_channels, options)
        else:
            settings = self._reference_settings(config_path, config, mask_channels, options, notes)
        if options.autoencoder is not None:
            if not settings.get("latent_space"):
                raise MedsynthError(f"--autoencoder: {source} is a pixel-space UNet, which decodes with no "
                                    "autoencoder")
            # the exported latent model decodes with this file (checked against its recorded SHA-256 at sampling)
            settings["latent_space"] = {**settings["latent_space"], "autoencoder": str(options.autoencoder)}
        num_class_embeds = config.get("num_class_embeds")
        if num_class_embeds is not None and not settings.get("class_names"):
            raise MedsynthError(f"{config_path}: a class-conditional UNet (num_class_embeds={num_class_embeds}) of the "
                                "reference's experimental class-guidance mode; its labels mean something else in "
                                "medsynth and are not imported")
        net = self._net_config(config_path, config)
        image_size = self._image_size(config_path, config)
        state_dict = self._weights(folder, config, net, image_channels + mask_channels, image_channels)
        model_args = {"net": net, **settings, "image_channels": image_channels, "image_size": image_size}
        data_args = {"num_classes": settings["num_classes"], "image_size": image_size, "channels": image_channels}
        return Imported(
            model={"class_path": "medsynth.modules.DiffusionModule", "init_args": model_args},
            state_dict={f"net.unet.{k}": v for k, v in state_dict.items()},
            data={"class_path": "medsynth.data.SegGuidedImageDataModule", "init_args": data_args},
            notes=notes,
        )

    # ----------------------------------------------------------------- settings
    @staticmethod
    def _reference_settings(path: Path, config: dict, mask_channels: int, options: ImportOptions,
                            notes: list[str]) -> dict:
        """The segmentation-guided project's settings: scalar masks (when a mask channel exists), epsilon on 1000
        linear DDPM steps, DDIM 50 sampling; a ``scheduler/`` folder beside ``unet/`` may say otherwise."""
        if mask_channels < 0:
            raise MedsynthError(f"{path}: in_channels={config.get('in_channels')} is below out_channels="
                                f"{config.get('out_channels')}; not a denoising UNet")
        if mask_channels > 1:
            raise MedsynthError(f"{path}: {mask_channels} conditioning channels (in_channels - out_channels); the "
                                "segmentation-guided project conditions on one mask channel (its 'multi' channel "
                                "mode is unimplemented there), so this net's conditioning is unknown")
        if mask_channels == 1:
            k = options.num_classes
            if k is None:
                raise MedsynthError(f"{path}: a mask-guided UNet (one k/255 mask channel) whose class count no file "
                                    "records: give --num_classes K (mask classes counting background)")
            if not 2 <= k <= 256:
                raise MedsynthError(f"--num_classes {k}: a k/255 mask channel holds 2 to 256 classes (counting "
                                    "background)")
            num_classes = k
        else:
            if options.num_classes:
                raise MedsynthError(f"--num_classes {options.num_classes}: {path} is an unconditional UNet "
                                    "(in_channels = out_channels): it takes no mask")
            num_classes = 0
        objective = _objective_from_scheduler(path.parent.parent / "scheduler" / "scheduler_config.json", notes)
        return {"objective": objective, "sampler": REFERENCE_SAMPLER, "num_classes": num_classes,
                "mask_encoding": "scalar"}

    @staticmethod
    def _exported_settings(path: Path, exported: dict, mask_channels: int, options: ImportOptions) -> dict:
        """The settings a ``medsynth export`` recorded (they need no flag)."""
        try:
            settings = {k: exported[k] for k in ("objective", "sampler", "num_classes", "mask_encoding")}
        except KeyError as exc:
            raise MedsynthError(f"{path}: its '{EXPORT_RECORD_KEY}' record lacks {exc}; a damaged medsynth export?") from None
        for key in ("class_names", "output", "label_drop_prob", "latent_space"):
            if exported.get(key) is not None:
                settings[key] = exported[key]
        if options.num_classes is not None and options.num_classes != settings["num_classes"]:
            raise MedsynthError(f"--num_classes {options.num_classes}: {path} records num_classes="
                                f"{settings['num_classes']} (a medsynth export); leave the flag out")
        return settings

    # ----------------------------------------------------------------- net
    @staticmethod
    def _net_config(path: Path, config: dict) -> dict:
        """medsynth's ``UNet2D`` config building the same ``UNet2DModel``; refuses settings it cannot express."""
        down = list(config.get("down_block_types") or [])
        if not down or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down):
            raise MedsynthError(f"{path}: down_block_types {down} are not DownBlock2D/AttnDownBlock2D, which medsynth's "
                                "UNet2D builds")
        init_args = {
            "block_out_channels": [int(c) for c in config.get("block_out_channels", [])],
            "attention_levels": [t == "AttnDownBlock2D" for t in down],
            "layers_per_block": int(config.get("layers_per_block", 2)),
            "attention_head_dim": config.get("attention_head_dim", 8),
            "norm_num_groups": int(config.get("norm_num_groups", 32)),
            "dropout": float(config.get("dropout", 0.0)),
            "num_class_embeds": None,  # a class-conditional DiffusionModule sets it (its labels plus the null one)
        }
        try:
            built = UNet2D(int(config["in_channels"]), int(config["out_channels"]),
                           **{**init_args, "num_class_embeds": config.get("num_class_embeds")}).unet.config
        except (MedsynthError, KeyError, TypeError, ValueError) as exc:
            raise MedsynthError(f"{path}: medsynth's UNet2D cannot build this net ({' '.join(str(exc).split())})"
                                ) from None
        for key, value in config.items():
            if key in IGNORED_CONFIG_KEYS or key.startswith("_") or key not in built:
                continue
            mine = built[key]
            if _normalised(mine) != _normalised(value):
                raise MedsynthError(f"{path}: {key}={value!r} differs from what medsynth's UNet2D builds "
                                    f"({mine!r}); this net cannot be imported")
        return {"class_path": "medsynth.nets.UNet2D", "init_args": init_args}

    @staticmethod
    def _image_size(path: Path, config: dict) -> int:
        size = config.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise MedsynthError(f"{path}: sample_size={list(size)} is not square; medsynth samples square images "
                                    "(data.image_size)")
            size = size[0]
        if not isinstance(size, int) or size < 8:
            raise MedsynthError(f"{path}: sample_size={size!r} is not an image side in pixels")
        return size

    @staticmethod
    def _weights(folder: Path, config: dict, net: dict, in_channels: int, out_channels: int) -> dict:
        """The UNet's weights, read by diffusers (which also renames the keys of older diffusers versions)."""
        if not any((folder / n).is_file() for n in ("diffusion_pytorch_model.safetensors",
                                                      "diffusion_pytorch_model.bin")):
            raise MedsynthError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) beside config.json; the "
                                "published checkpoints must be renamed so (see docs/coming-from.md)")
        logger = logging.getLogger("diffusers")
        level = logger.level
        logger.setLevel(logging.ERROR)  # its notes on config keys it does not know (e.g. ours) are not the user's
        try:
            unet = UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)
        except Exception as exc:  # noqa: BLE001 - any failure to read the weights is one problem for the user
            raise MedsynthError(f"{folder}: unreadable UNet weights ({' '.join(str(exc).split())[:200]})") from None
        finally:
            logger.setLevel(level)
        return unet.state_dict()


def _normalised(value):
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    return value


def _objective_from_scheduler(path: Path, notes: list[str]) -> dict:
    """The DDPM objective a pipeline folder's ``scheduler/scheduler_config.json`` describes (the reference's
    defaults when there is none)."""
    if not path.is_file():
        notes.append("no scheduler/ beside unet/: assumed the segmentation-guided project's noise process (epsilon, "
                     "1000 linear DDPM steps)")
        return REFERENCE_OBJECTIVE
    scheduler = _read_config(path)
    kind = scheduler.get("_class_name")
    if kind not in ("DDPMScheduler", "DDIMScheduler"):
        raise MedsynthError(f"{path}: a {kind} schedule; a UNet of the segmentation-guided project is trained on a "
                            "DDPM schedule (DDPMScheduler or DDIMScheduler)")
    if scheduler.get("trained_betas") is not None:
        raise MedsynthError(f"{path}: trained_betas (an explicit beta list) is not a schedule medsynth's "
                            "DDPMObjective expresses")
    defaults = REFERENCE_OBJECTIVE["init_args"]
    init_args = {k: scheduler.get(k, defaults[k]) for k in defaults}
    if init_args["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise MedsynthError(f"{path}: beta_schedule={init_args['beta_schedule']!r} is not one medsynth's "
                            "DDPMObjective offers (linear, scaled_linear, squaredcos_cap_v2)")
    if init_args["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise MedsynthError(f"{path}: prediction_type={init_args['prediction_type']!r} is not one of epsilon, "
                            "v_prediction, sample")
    sampling = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True, "thresholding": False,
                "rescale_betas_zero_snr": False}
    differ = [f"{k}={scheduler[k]!r}" for k, v in sampling.items() if k in scheduler and scheduler[k] != v]
    if differ:
        notes.append(f"{path.name}: {', '.join(differ)} not carried over (medsynth's samplers use diffusers' "
                     "defaults, as the segmentation-guided project does)")
    return {"class_path": REFERENCE_OBJECTIVE["class_path"], "init_args": init_args}


CONVERTERS = [DiffusersUNetConverter()]
"""The formats this module reads (listed in :data:`medsynth.convert.CONVERTERS`)."""
