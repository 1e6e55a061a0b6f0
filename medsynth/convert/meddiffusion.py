"""Converters for 3D MedDiffusion checkpoints (ShanghaiTech-IMPACT/3D-MedDiffusion; Wang et al., 2024).

Two formats, both read without the original code or its dependencies (OmegaConf, timm):

- **PatchVolume** (:class:`PatchVolumeConverter`): the Lightning ``.ckpt`` that ``train/train_PatchVolume.py``
  writes, at 4x or 8x, stage 1 or 2. Encoder, decoder, pre/post-VQ convolutions and the EMA codebook become a
  :class:`~medsynth.modules.AutoencoderModule` around :class:`~medsynth.nets.PatchVolumeAutoencoder` with the
  original's options; the discriminator (a BatchNorm N-layer net MONAI does not have) and the perceptual network
  are left out.
- **BiFlowNet** (:class:`BiFlowNetConverter`): the ``.pt`` that ``train/train_BiFlowNet_SingleRes.py`` writes
  (``model``, ``ema``, ``args``, ...). The EMA weights (or ``options.weights="model"``) become a latent
  :class:`~medsynth.modules.DiffusionModule` around :class:`~medsynth.nets.BiFlowNet3D` (``variant:
  meddiffusion``) that samples as ``evaluation/class_conditional_generation.py`` does: 1000 DDPM steps on the
  cosine schedule, latents min-max scaled by the codebook of the autoencoder it decodes with
  (``options.autoencoder``, the medsynth checkpoint of the imported PatchVolume), large latents decoded in chunks.

The architecture is read from the weights' names and shapes, so a checkpoint trained with other widths, levels
or class counts converts as well; what the weights cannot tell (GroupNorm groups, attention heads) is taken from
the original's code and reported in :attr:`~medsynth.convert.Imported.notes`.

Checkpoints are unpickled with a restricted unpickler: torch's own tensors and containers, ``argparse.Namespace``
and paths are rebuilt; any other class (e.g. OmegaConf's ``DictConfig`` of the Lightning hyperparameters) is
read as inert data and never imported or called.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
import types
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from medsynth.convert import Imported, ImportOptions
from medsynth.errors import MedsynthError
from medsynth.io import load_checkpoint
from medsynth.nets.biflownet import sincos_grid_embedding
from medsynth.provenance import file_sha256

# The original's settings its weights do not reveal (its constructors' defaults).
BIFLOWNET_GROUPS, BIFLOWNET_ATTENTION_HEADS, BIFLOWNET_DIT_HEADS, BIFLOWNET_SUB_VOLUME = 24, 8, 8, 8
PATCHVOLUME_GROUPS, PATCHVOLUME_ATTENTION_HEADS = 24, 4
ATTENTION_HEAD_DIM = 32
# The chunk its generation script decodes large latents in: 256 voxels at 8x (decode_sliding's default).
DECODE_CHUNK = 32
# The class names of its published 7-class model (evaluation/class_conditional_generation.py).
PUBLISHED_CLASSES = ["CTHeadNeck", "CTChestAbdomen", "CTLegs", "MRT1Brain", "MRT2Brain", "MRAbdomen", "MRKnee"]


# ----------------------------------------------------------------------------------------------- reading


class _Inert:
    """Stands for a class of the checkpoint that is not imported: keeps constructor arguments and state only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # pickled dict subclasses fill themselves by SETITEMS
        self.kwargs[key] = value


def _plain_dict(*args: Any) -> dict:
    """A ``defaultdict`` read as a plain dict (its factory is not kept)."""
    return {}


_EXTRA_GLOBALS = {
    ("argparse", "Namespace"): argparse.Namespace,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "Path"): pathlib.PurePath,
    ("collections", "defaultdict"): _plain_dict,
}
_BUILTIN_TYPES = {t.__name__: t for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bool,
                                          slice, bytearray)}


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds what torch's ``weights_only`` loader allows, plus Namespaces and paths; anything else is inert."""

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _get_allowed_globals().get(f"{module}.{name}")
        if allowed is not None:
            return allowed
        if (module, name) in _EXTRA_GLOBALS:
            return _EXTRA_GLOBALS[(module, name)]
        if module in ("builtins", "__builtin__") and name in _BUILTIN_TYPES:
            return _BUILTIN_TYPES[name]
        return type(name, (_Inert,), {"__module__": f"inert.{module}"})


_restricted_pickle = types.SimpleNamespace(
    __name__="medsynth_restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),  # torch's legacy format reads headers
)


@lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> Any:
    import zipfile

    # memory-mapped where the file is torch's zip format (large checkpoints are then read lazily)
    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle, mmap=mmap)


def load_foreign_checkpoint(path: Path) -> Any:
    """The unpickled content of a torch checkpoint, read with the restricted unpickler (cached per file version).

    Raises:
        MedsynthError: the file is missing or not a readable torch checkpoint (e.g. truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"{path}: no such file")
    stat = path.stat()
    try:
        return _load_cached(str(path), stat.st_mtime_ns, stat.st_size)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the file's fault
        raise MedsynthError(f"{path}: not a readable torch checkpoint ({' '.join(str(exc).split())[:160]})") from None


def _plain(value: Any) -> Any:
    """Inert OmegaConf containers (``DictConfig``/``ListConfig``/nodes) to plain dicts, lists and values."""
    if isinstance(value, _Inert):
        state = value.state if isinstance(value.state, dict) else {}
        if "_content" in state:
            return _plain(state["_content"])
        if "_val" in state:
            return _plain(state["_val"])
        return {k: _plain(v) for k, v in value.kwargs.items()} if value.kwargs else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


def _tensor_dict(value: Any) -> Optional[dict[str, Tensor]]:
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        return value
    return None


def _shape(state: dict[str, Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise MedsynthError(f"{path}: lacks {key}, which a 3D MedDiffusion checkpoint of this kind has")
    return tuple(state[key].shape)


def _count(state: dict[str, Tensor], pattern: str) -> int:
    """How many indices ``i`` some key matching ``pattern.format(i=...)`` has (``pattern`` a regex with ``(\\d+)``)."""
    indices = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(indices) + 1 if indices else 0


def _check_complete(mapping: dict[str, str], state: dict[str, Tensor], own_shapes: dict[str, tuple], path: Path,
                    ignored: tuple[str, ...] = ()) -> None:
    """Refuse a mapping that leaves a medsynth tensor unfilled, a source tensor unused, or a shape mismatched."""
    filled = set(mapping.values())
    missing = [k for k in own_shapes if k not in filled]
    if missing:
        raise MedsynthError(f"{path}: no weights for {missing[0]} (the checkpoint's architecture differs from "
                            "3D MedDiffusion's)")
    unused = [k for k in state if k not in mapping and not k.startswith(ignored)]
    if unused:
        raise MedsynthError(f"{path}: holds {unused[0]}, which 3D MedDiffusion's network does not have (a modified "
                            "architecture?)")
    for src, dst in mapping.items():
        if tuple(state[src].shape) != own_shapes[dst]:
            raise MedsynthError(f"{path}: {src} is {tuple(state[src].shape)}, but the network read from its other "
                                f"weights needs {own_shapes[dst]} for it")


def _shapes_of(class_path: str, init_args: dict, prefix: str) -> dict[str, tuple]:
    """State-dict shapes of a net built on the meta device (no memory, no time)."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    with torch.device("meta"):
        net = cls(**init_args)
    return {prefix + k: tuple(v.shape) for k, v in net.state_dict().items()}


class _FileConverter:
    """A converter of one checkpoint file format, recognised by what :meth:`_weights` finds in its content."""

    name: str
    kind: str  # what the refusal calls the expected file

    def _weights(self, ckpt: Any) -> Any:
        """The weights this format holds in ``ckpt``, or ``None`` when ``ckpt`` is not in this format."""
        raise NotImplementedError

    def detect(self, source: Path) -> bool:
        try:
            return Path(source).is_file() and self._weights(load_foreign_checkpoint(Path(source))) is not None
        except Exception:  # noqa: BLE001 - detection never raises
            return False

    def _read(self, path: Path) -> tuple[Any, Any]:
        """``(checkpoint, weights)`` of ``path``, or one line saying why it is not in this format."""
        ckpt = load_foreign_checkpoint(path)
        weights = self._weights(ckpt)
        if weights is None:
            raise MedsynthError(f"{path}: not a {self.kind}")
        return ckpt, weights


# ----------------------------------------------------------------------------------------------- PatchVolume


def _patchvolume_state(ckpt: Any) -> Optional[dict[str, Tensor]]:
    state = _tensor_dict(ckpt.get("state_dict")) if isinstance(ckpt, dict) else None
    if state and "encoder.conv_first.weight" in state and "codebook.embeddings" in state:
        return state
    return None


def _res_block_keys(src: str, dst: str, state: dict[str, Tensor]) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "resConv": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")
            if f"{src}.{a}.{p}" in state}


def _attention_keys(src: str, dst: str, norm: str = "norm") -> dict[str, str]:
    keys = {f"{src}.to_qkv.weight": f"{dst}.to_qkv.weight", f"{src}.to_out.weight": f"{dst}.to_out.weight",
            f"{src}.to_out.bias": f"{dst}.to_out.bias"}
    if norm == "norm":
        keys.update({f"{src}.norm.weight": f"{dst}.norm.weight", f"{src}.norm.bias": f"{dst}.norm.bias"})
    else:  # BiFlowNet: Residual(PreNorm(LayerNorm(gamma), AttentionBlock))
        keys = {k.replace(src, f"{src}.fn.fn", 1): v for k, v in keys.items()}
        keys[f"{src}.fn.norm.gamma"] = f"{dst}.norm.gamma"
    return keys


def patchvolume_key_map(state: dict[str, Tensor], levels: int, prefix: str = "net.") -> dict[str, str]:
    """Original PatchVolume state-dict names to :class:`~medsynth.nets.PatchVolumeAutoencoder`'s (with ``prefix``).

    Args:
        state: the original's ``state_dict`` (used to see which ResBlocks have a 1x1 skip conv).
        levels: the encoder's resolution levels (``log2(downsample) + 1``).
        prefix: prepended to medsynth's names (``net.`` for the LightningModule).
    """
    m: dict[str, str] = {}
    conv = lambda s, d: {f"{s}.{p}": f"{prefix}{d}.{p}" for p in ("weight", "bias")}  # noqa: E731

    def resolution_levels(side: str, sampler: str, i: int) -> int:
        """Map ``side``'s levels (two ResBlocks, then a sampler between levels) from Sequential index ``i`` on."""
        for level in range(levels):
            for res in ("res1", "res2"):
                m.update(_res_block_keys(f"{side}.conv_blocks.{level}.{res}", f"{prefix}{side}.{i}", state))
                i += 1
            if level < levels - 1:
                m.update(conv(f"{side}.conv_blocks.{level}.{sampler}", f"{side}.{i}"))
                i += 1
        return i

    m.update(conv("encoder.conv_first", "encoder.0"))
    i = resolution_levels("encoder", "down", 1)
    m.update(_res_block_keys("encoder.mid_block.res1", f"{prefix}encoder.{i}", state))
    m.update({k: prefix + v for k, v in _attention_keys("encoder.mid_block.attn", f"encoder.{i + 1}").items()})
    m.update(_res_block_keys("encoder.mid_block.res2", f"{prefix}encoder.{i + 2}", state))
    m.update(conv("encoder.final_block.0", f"encoder.{i + 3}"))
    m.update(conv("encoder.final_block.2", f"encoder.{i + 5}"))

    m.update(conv("decoder.conv_first", "decoder.0"))
    m.update(_res_block_keys("decoder.mid_block.res1", f"{prefix}decoder.1", state))
    m.update({k: prefix + v for k, v in _attention_keys("decoder.mid_block.attn", "decoder.2").items()})
    m.update(_res_block_keys("decoder.mid_block.res2", f"{prefix}decoder.3", state))
    i = resolution_levels("decoder", "up.conv_trans", 4)
    m.update(conv("decoder.final_block.0", f"decoder.{i}"))
    m.update(conv("decoder.final_block.2", f"decoder.{i + 2}"))
    m.update(conv("pre_vq_conv", "pre_quant_conv"))
    m.update(conv("post_vq_conv", "post_quant_conv"))
    m.update({"codebook.embeddings": f"{prefix}quantizer.codebook", "codebook.N": f"{prefix}quantizer.cluster_size",
              "codebook.z_avg": f"{prefix}quantizer.embed_sum"})
    return m


def patchvolume_net_args(state: dict[str, Tensor], path: Path, num_groups: int = PATCHVOLUME_GROUPS) -> dict:
    """:class:`~medsynth.nets.PatchVolumeAutoencoder` arguments of the original network the weights belong to."""
    hidden, image_channels = _shape(state, "encoder.conv_first.weight", path)[:2]
    num_codes, latent = _shape(state, "codebook.embeddings", path)
    levels = _count(state, r"encoder\.conv_blocks\.(\d+)\.")
    if levels < 2:
        raise MedsynthError(f"{path}: its encoder has {levels} level(s); 3D MedDiffusion's has at least 2")
    channels = [hidden * 2**i for i in range(levels - 1)]
    return dict(
        spatial_dims=3, in_channels=image_channels, channels=channels + [channels[-1]], num_res_blocks=2,
        latent_channels=latent, num_codes=num_codes, decay=0.99, commitment_weight=0.25, dead_code_threshold=1.0,
        norm_num_groups=num_groups, norm_eps=1e-6, mid_attention_heads=PATCHVOLUME_ATTENTION_HEADS,
        attention_head_dim=ATTENTION_HEAD_DIM, quant_convs=True, downsample_kernel=4, upsample="transposed",
        encoder_out_kernel=3,
    )


class PatchVolumeConverter(_FileConverter):
    """3D MedDiffusion's PatchVolume autoencoder: the Lightning ``.ckpt`` of ``train/train_PatchVolume.py``."""

    name = "meddiffusion-patchvolume"
    kind = "3D MedDiffusion PatchVolume checkpoint (no encoder.conv_first and codebook.embeddings in its state_dict)"

    def _weights(self, ckpt: Any) -> Optional[dict[str, Tensor]]:
        return _patchvolume_state(ckpt)

    def convert(self, source: Path, options: ImportOptions) -> Imported:
        path = Path(source)
        ckpt, state = self._read(path)
        hparams = _plain(ckpt.get("hyper_parameters"))
        cfg = (hparams.get("cfg") if isinstance(hparams, dict) else None) or {}
        model_cfg, data_cfg = cfg.get("model") or {}, cfg.get("dataset") or {}
        notes = []
        if not cfg:
            notes.append("the checkpoint's hyperparameters were unreadable: GroupNorm groups 24, 64^3 patches and "
                         "the published loss weights assumed")
        net_args = patchvolume_net_args(state, path, int(model_cfg.get("num_groups", PATCHVOLUME_GROUPS)))
        levels = len(net_args["channels"])
        factor = 2 ** (levels - 1)
        downsample = model_cfg.get("downsample")
        if downsample and any(int(d) != factor for d in downsample):
            raise MedsynthError(f"{path}: its config says downsample {list(downsample)} but its weights have "
                                f"{levels} levels ({factor}x)")
        mapping = patchvolume_key_map(state, levels)
        net_cfg = {"class_path": "medsynth.nets.PatchVolumeAutoencoder", "init_args": net_args}
        own = _shapes_of(net_cfg["class_path"], net_args, "net.")
        _check_complete(mapping, state, own, path, ignored=("volume_discriminator.", "perceptual_loss."))
        stage = int(model_cfg.get("stage", 1) or 1)
        patch = int(data_cfg.get("patch_size", 64) or 64)
        init_args = dict(
            net=net_cfg, discriminator=None, image_channels=net_args["in_channels"], image_size=patch,
            l1_weight=float(model_cfg.get("l1_weight", 4.0)), reg_weight=1.0,
            perceptual_weight=float(model_cfg.get("perceptual_weight", 2.0)), adversarial_criterion="hinge",
            adversarial_weight=float(model_cfg.get("volume_gan_weight", 2.0)),
            adversarial_start_step=int(model_cfg.get("discriminator_iter_start", 12000 if factor == 4 else 20000)),
            feature_matching_weight=float(model_cfg.get("gan_feat_weight", 4.0)),
            lr=float(model_cfg.get("lr", 3e-4)), predict_patch_size=patch, latent_scaling="minmax",  # Adam (0.5, 0.9)
            predict_overlap=0.0,  # the original decodes large latents in chunks side by side, without blending
        )
        notes.append(f"3D MedDiffusion PatchVolume, {factor}x per axis, stage {stage}, codebook "
                     f"{net_args['num_codes']} x {net_args['latent_channels']}")
        if stage == 2:  # freeze_encoder needs init_from: a stage-2 run starts from this checkpoint
            notes.append("stage 2 continues with --config configs/ae3d_stage2.yaml --model.init_from OUT.ckpt")
        notes.append("its discriminator (an N-layer BatchNorm net) and perceptual network are not carried over: "
                     "fine-tuning with a GAN starts a new MONAI PatchDiscriminator (--model.discriminator)")
        return Imported(
            model={"class_path": "medsynth.modules.AutoencoderModule", "init_args": init_args},
            state_dict={dst: state[src].clone() for src, dst in mapping.items()},
            # the original trains on volumes stored in [0, 1] and maps them linearly to [-1, 1]
            data={"class_path": "medsynth.data.VolumeDataModule",
                  "init_args": {"patch_size": patch, "normalization": "ct", "ct_window": [0.0, 1.0]}},
            notes=notes,
        )


# ----------------------------------------------------------------------------------------------- BiFlowNet


def _biflownet_states(ckpt: Any) -> Optional[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    if not isinstance(ckpt, dict):
        return None
    model, ema = _tensor_dict(ckpt.get("model")), _tensor_dict(ckpt.get("ema"))
    if model and ema and "init_conv.weight" in ema and any(k.startswith("IntraPatchFlow_input.") for k in ema):
        return model, ema
    return None


def _dit_block_keys(src: str, dst: str) -> dict[str, str]:
    names = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
             "adaLN_modulation.1": "modulation.1", "skip_linear": "skip_linear", "linear": "linear"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _resnet_keys(src: str, dst: str) -> dict[str, str]:
    parts = ("mlp.1", "block1.proj", "block1.norm", "block2.proj", "block2.norm", "res_conv")
    return {f"{src}.{q}.{p}": f"{dst}.{q}.{p}" for q in parts for p in ("weight", "bias")}


def biflownet_key_map(state: dict[str, Tensor], levels: int, prefix: str = "net.") -> dict[str, str]:
    """Original BiFlowNet state-dict names to :class:`~medsynth.nets.BiFlowNet3D`'s (``variant="meddiffusion"``).

    Only names present in ``state`` are kept (optional parts: attention, 1x1 skips, class and resolution MLPs).
    """
    m: dict[str, str] = {}
    conv = lambda s, d: {f"{s}.{p}": f"{d}.{p}" for p in ("weight", "bias")}  # noqa: E731
    m.update(conv("init_conv", "conv_in"))
    m.update(conv("time_mlp.1", "time_mlp.0"))
    m.update(conv("time_mlp.3", "time_mlp.2"))
    m.update(conv("res_mlp.0", "resolution_mlp.0"))
    m.update(conv("res_mlp.2", "resolution_mlp.2"))
    m["cond_emb.weight"] = "class_embedding.weight"
    m.update(conv("x_embedder.proj", "patch_embed"))
    for i in range(_count(state, r"IntraPatchFlow_input\.(\d+)\.")):
        m.update(_dit_block_keys(f"IntraPatchFlow_input.{i}.0", f"dit_input_blocks.{i}"))
        m.update(_dit_block_keys(f"IntraPatchFlow_input.{i}.1", f"dit_input_final.{i}"))
    for i in range(_count(state, r"IntraPatchFlow_mid\.(\d+)\.")):
        m.update(_dit_block_keys(f"IntraPatchFlow_mid.{i}", f"dit_blocks.{i}"))
    for i in range(_count(state, r"IntraPatchFlow_output\.(\d+)\.")):
        m.update(_dit_block_keys(f"IntraPatchFlow_output.{i}.0", f"dit_output_blocks.{i}"))
        m.update(_dit_block_keys(f"IntraPatchFlow_output.{i}.1", f"dit_output_final.{i}"))
    for i in range(levels):
        m.update(_resnet_keys(f"downs.{i}.0", f"down_levels.{i}.0"))
        m.update(_attention_keys(f"downs.{i}.1", f"down_attentions.{i}.0", norm="gamma"))
        m.update(_resnet_keys(f"downs.{i}.2", f"down_levels.{i}.1"))
        m.update(_attention_keys(f"downs.{i}.3", f"down_attentions.{i}.1", norm="gamma"))
        m.update(conv(f"downs.{i}.4", f"downsamplers.{i}"))
        level = levels - 1 - i  # ups run from the lowest level up
        m.update(_resnet_keys(f"ups.{i}.0", f"up_levels.{level}.0"))
        m.update(_attention_keys(f"ups.{i}.1", f"up_attentions.{level}.0", norm="gamma"))
        m.update(_resnet_keys(f"ups.{i}.2", f"up_levels.{level}.1"))
        m.update(_attention_keys(f"ups.{i}.3", f"up_attentions.{level}.1", norm="gamma"))
        m.update(conv(f"ups.{i}.4", f"upsamplers.{level - 1}"))
    m.update(_resnet_keys("mid_block1", "mid_block1"))
    m.update(_attention_keys("mid_spatial_attn", "mid_attention", norm="gamma"))
    m.update(_resnet_keys("mid_block2", "mid_block2"))
    m.update(_resnet_keys("final_conv.0", "final_block"))
    m.update(conv("final_conv.1", "conv_out"))
    return {k: prefix + v for k, v in m.items() if k in state}


def biflownet_net_args(state: dict[str, Tensor], path: Path) -> tuple[dict, int]:
    """:class:`~medsynth.nets.BiFlowNet3D` arguments (without the channels the module sets) of the weights, and the
    latent channels."""
    dim, latent = _shape(state, "init_conv.weight", path)[:2]
    levels = _count(state, r"downs\.(\d+)\.")
    channels = [_shape(state, f"downs.{i}.0.block1.proj.weight", path)[0] for i in range(levels)]
    full_res = _count(state, r"IntraPatchFlow_input\.(\d+)\.")
    if channels[0] != dim or full_res < 1 or any(c != dim for c in channels[:full_res]):
        raise MedsynthError(f"{path}: UNet widths {channels} with {full_res} DiT fusion level(s) are not a layout "
                            "BiFlowNet3D reproduces (the first multiplier must be 1 and the fused levels full width)")
    token_patch = _shape(state, "x_embedder.proj.weight", path)[-1]
    if "res_mlp.0.weight" not in state:
        raise MedsynthError(f"{path}: has no resolution MLP (res_mlp), which 3D MedDiffusion's BiFlowNet always has")
    return dict(
        variant="meddiffusion", channels=channels, num_res_blocks=2, norm_num_groups=BIFLOWNET_GROUPS,
        mid_attention_heads=BIFLOWNET_ATTENTION_HEADS, attention_head_dim=ATTENTION_HEAD_DIM,
        attention_levels=[i for i in range(levels) if f"downs.{i}.1.fn.norm.gamma" in state],
        full_resolution_levels=full_res, dit_patch=BIFLOWNET_SUB_VOLUME, dit_token_patch=token_patch, dit_hidden=dim,
        dit_depth=_count(state, r"IntraPatchFlow_mid\.(\d+)\."), dit_heads=BIFLOWNET_DIT_HEADS,
        dit_fusion=["early", "late"], resolution_conditioning=True,
    ), latent


def autoencoder_latent_space(autoencoder: Path) -> dict:
    """The ``latent_space`` of a :class:`~medsynth.modules.DiffusionModule` that decodes with ``autoencoder`` (a
    medsynth PatchVolume checkpoint) as 3D MedDiffusion does: latents min-max scaled by the codebook's range.

    The original maps a sample ``s`` in [-1, 1] to ``(s + 1) / 2 * (max - min) + min``, which is medsynth's
    ``s / scale + shift`` with ``scale = 2 / (max - min)`` and ``shift = (max + min) / 2``.
    """
    ckpt = load_checkpoint(autoencoder, "autoencoder checkpoint")
    codebook = (ckpt.get("state_dict") or {}).get("net.quantizer.codebook")
    if codebook is None:
        raise MedsynthError(f"{autoencoder}: not a PatchVolume autoencoder checkpoint (no codebook)")
    low, high = float(codebook.min()), float(codebook.max())
    if not high > low:
        raise MedsynthError(f"{autoencoder}: its codebook has no range (min = max = {low})")
    net = ((ckpt.get("hyper_parameters") or {}).get("net") or {}).get("init_args") or {}
    return {"method": "minmax", "shift": (high + low) / 2, "scale": 2 / (high - low),
            "autoencoder": str(autoencoder), "autoencoder_sha256": file_sha256(autoencoder),
            "latent_channels": int(codebook.shape[1]),
            "downsample_factor": 2 ** (len(net["channels"]) - 1) if net.get("channels") else None,
            "spacing": [1.0, 1.0, 1.0]}


class BiFlowNetConverter(_FileConverter):
    """3D MedDiffusion's BiFlowNet: the ``.pt`` of ``train/train_BiFlowNet_SingleRes.py`` (``model``, ``ema``, ``args``)."""

    name = "meddiffusion-biflownet"
    kind = "3D MedDiffusion BiFlowNet checkpoint (no 'model' and 'ema' weights with IntraPatchFlow blocks)"

    def _weights(self, ckpt: Any) -> Optional[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        return _biflownet_states(ckpt)

    def convert(self, source: Path, options: ImportOptions) -> Imported:
        path = Path(source)
        ckpt, states = self._read(path)
        if options.weights not in ("ema", "model"):
            raise MedsynthError(f"--weights {options.weights!r}: choose ema or model")
        state = states[1] if options.weights == "ema" else states[0]
        args = _plain(ckpt.get("args")) or {}
        net_args, latent = biflownet_net_args(state, path)
        levels = len(net_args["channels"])
        notes = [f"3D MedDiffusion BiFlowNet ({options.weights} weights): channels {net_args['channels']}, "
                 f"attention at levels {net_args['attention_levels']}, token patch {net_args['dit_token_patch']}"]
        pos = state.get("pos_embed")
        if pos is not None:  # the frozen table is recomputed; check it is the one the net was trained with
            grid = BIFLOWNET_SUB_VOLUME // net_args["dit_token_patch"]
            if not torch.allclose(pos[0].float(), sincos_grid_embedding((grid,) * 3, net_args["dit_hidden"]),
                                  atol=1e-5):
                raise MedsynthError(f"{path}: its pos_embed is not the frozen 3D sin-cos table the original computes")
        mapping = biflownet_key_map(state, levels, prefix="")
        num_classes = state["cond_emb.weight"].shape[0] if "cond_emb.weight" in state else None
        if not num_classes:
            raise MedsynthError(f"{path}: has no class embedding (cond_emb); medsynth imports class-conditional "
                                "BiFlowNets only")
        own = _shapes_of("medsynth.nets.BiFlowNet3D",
                         dict(net_args, in_channels=latent, out_channels=latent, num_class_embeds=num_classes), "")
        _check_complete(mapping, state, own, path, ignored=("pos_embed",))
        weights = {f"net.{dst}": state[src].float().clone() for src, dst in mapping.items()}
        # medsynth's DiffusionModule keeps one more (null) label for guidance; it is never used at guidance 1.
        emb = weights["net.class_embedding.weight"]
        weights["net.class_embedding.weight"] = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])

        resolution = [int(r) for r in args.get("resolution") or [32, 32, 32]]
        timesteps = int(args.get("timesteps") or 1000)
        loss = str(args.get("loss_type") or "l1")
        if loss not in ("l1", "l2"):
            raise MedsynthError(f"{path}: its args name loss_type {loss!r}; 3D MedDiffusion has l1 and l2")
        class_names = (PUBLISHED_CLASSES if num_classes == len(PUBLISHED_CLASSES)
                       else [f"class{i}" for i in range(num_classes)])
        init_args: dict[str, Any] = dict(
            net={"class_path": "medsynth.nets.BiFlowNet3D", "init_args": net_args},
            objective={"class_path": "medsynth.diffusion.DDPMObjective", "init_args": {
                "prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": timesteps,
                "loss": "l1" if loss == "l1" else "mse", "max_beta": 0.9999}},
            sampler={"class_path": "medsynth.diffusion.DDPMSampler",
                     "init_args": {"num_inference_steps": timesteps}},
            image_channels=latent, image_size=resolution[0], sample_shape=resolution, class_names=class_names,
            label_drop_prob=0.0, guidance_scale=1.0, lr=1e-4,
            optimizer={"class_path": "torch.optim.Adam", "init_args": {"weight_decay": 0.0}},  # the original's Adam
            lr_warmup_steps=0, lr_schedule="constant",
            decode_tile=DECODE_CHUNK,
        )
        if options.autoencoder is not None:
            space = autoencoder_latent_space(Path(options.autoencoder))
            if space["latent_channels"] != latent:
                raise MedsynthError(f"{options.autoencoder}: the autoencoder has {space['latent_channels']} latent "
                                    f"channels but {path} generates {latent}")
            init_args["latent_space"], init_args["autoencoder"] = space, str(options.autoencoder)
            low, high = space["shift"] - 1 / space["scale"], space["shift"] + 1 / space["scale"]
            notes.append(f"latents decode with {options.autoencoder} (codebook range [{low:.4g}, {high:.4g}]; "
                         f"latents above {DECODE_CHUNK}^3 in chunks of {DECODE_CHUNK}^3)")
        else:
            notes.append("no --autoencoder given: the model knows no latent space, so `medsynth predict` needs a "
                         "latent manifest (--data.manifest); import it again with --autoencoder AE.ckpt (the imported "
                         "PatchVolume) to generate volumes")
        if class_names is PUBLISHED_CLASSES:
            notes.append("7 classes: named as the published model's (" + ", ".join(PUBLISHED_CLASSES) + ")")
        return Imported(
            model={"class_path": "medsynth.modules.DiffusionModule", "init_args": init_args},
            state_dict=weights,
            data={"class_path": "medsynth.data.LatentDataModule",
                  "init_args": {"crop_size": resolution[0], "batch_size": int(args.get("batch_size") or 1)}},
            notes=notes,
        )


def instantiate(imported: Imported):
    """The LightningModule ``imported`` describes, with its weights loaded (strictly), in eval mode."""
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    module = parser.instantiate_classes(parser.parse_object({"model": imported.model})).model
    module.load_state_dict(imported.state_dict)
    return module.eval()


CONVERTERS = [PatchVolumeConverter(), BiFlowNetConverter()]

__all__ = ["CONVERTERS", "PatchVolumeConverter", "BiFlowNetConverter", "load_foreign_checkpoint", "instantiate",
           "patchvolume_key_map", "biflownet_key_map", "autoencoder_latent_space"]
