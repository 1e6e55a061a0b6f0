"""Checks the CLI runs on a built model before anything is written: can its denoising net take the shapes it will
be given (an image side its downsampling does not divide fails only at the first forward pass, mid-run)?"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
from torch import nn

from medsynth.contracts import ChecksSpatialShape
from medsynth.errors import MedsynthError


def _meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _forward_fails(net: nn.Module, args: tuple, kwargs: dict, meta: bool) -> Optional[BaseException]:
    """The exception one forward pass of ``net`` raises (``None`` if it passes). On the meta device the pass
    propagates shapes only: no compute, no memory."""
    try:
        with torch.no_grad():
            if meta:
                state = {k: torch.empty_like(v, device="meta")
                         for k, v in itertools.chain(net.named_parameters(), net.named_buffers())}
                torch.func.functional_call(net, state, tuple(_meta(a) for a in args),
                                           {k: _meta(v) for k, v in kwargs.items()}, strict=False)
            else:
                net(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the net raises on this shape
        return exc
    return None


def denoiser_inputs(model, spatial: Sequence[int]) -> tuple[tuple, dict]:
    """The net inputs a diffusion model builds for one sample of ``spatial`` shape: the noised image with its
    encoded condition as extra channels, the timestep, and the class label (the module's own ``condition``)."""
    batch = {"label": torch.zeros(1, dtype=torch.long)} if getattr(model, "class_conditional", False) else {}
    labels = batch.get("label")
    x = torch.zeros(1, int(model.image_channels), *spatial)
    if getattr(model, "conditional", False):
        embedding = getattr(model, "mask_embedding", None)
        if embedding is not None:  # the embedding's output, without building masks at image resolution
            cond = torch.zeros(1, embedding.proj.out_channels, *spatial)
        else:
            cond = model.condition(dict(batch, mask=torch.zeros(1, *spatial, dtype=torch.long)))[0]
        x = torch.cat([x, cond.to(x.dtype).cpu()], dim=1)
    kwargs = {"class_labels": labels.cpu()} if labels is not None else {}
    return (x, torch.zeros(1, dtype=torch.long)), kwargs


def check_denoiser_shape(model, spatial: Sequence[int], option: str) -> None:
    """Refuse a spatial shape the diffusion model's net cannot take, before training or sampling starts.

    One forward pass on the meta device finds the failure without computing; a shape that fails there is tried
    once for real (batch of one) before it is refused, so an operation meta tensors lack never refuses a good shape.

    Args:
        model: a diffusion module (``net``, ``condition``, ``image_channels``).
        spatial: the image (or latent) sides, e.g. ``(20, 20)``.
        option: the option that sets the shape, named in the message (e.g. ``data.image_size=20``).

    Raises:
        MedsynthError: naming ``option``, the shape, the net's complaint and a size that works, when one is found.
    """
    spatial = tuple(int(s) for s in spatial)
    if getattr(model, "net", None) is None or not hasattr(model, "condition"):
        return
    args, kwargs = denoiser_inputs(model, spatial)
    if _forward_fails(model.net, args, kwargs, meta=True) is None:
        return
    error = _forward_fails(model.net, args, kwargs, meta=False)
    if error is None:
        return
    hint = ""
    for k in range(1, 8):  # the nearest larger side that the net's downsampling divides
        step = 2**k
        candidate = tuple(math.ceil(s / step) * step for s in spatial)
        if candidate != spatial and _forward_fails(model.net, *denoiser_inputs(model, candidate), meta=True) is None:
            hint = f"; e.g. {'x'.join(map(str, candidate))} works"
            break
    text = " ".join(str(error).split())[:160]
    raise MedsynthError(f"{option}: model.net cannot take {'x'.join(map(str, spatial))} inputs "
                        f"({type(error).__name__}: {text}){hint}")


def check_training_shapes(net: nn.Module, datamodule) -> None:
    """Refuse training crops a net that checks its own shapes (``ChecksSpatialShape``, e.g. BiFlowNet's
    sub-volumes) cannot take, before anything is written."""
    shapes = getattr(datamodule, "training_shapes", None)
    if not isinstance(net, ChecksSpatialShape) or shapes is None:
        return
    for shape in shapes():
        try:
            net.check_spatial_shape(shape)
        except MedsynthError as exc:
            raise MedsynthError(f"data.crop_size: the training latents {list(shape)} do not fit the net: {exc}") from None
