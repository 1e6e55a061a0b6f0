"""Memory-bounded encoding and decoding of images and volumes larger than an autoencoder can take at once.

3D MedDiffusion's PatchVolume scheme (Wang et al., 2024): the encoder sees non-overlapping patches of the size it
was trained on and the latents are stitched into one latent of the whole volume (:func:`encode_patchwise`); the
decoder then decodes that latent jointly, or, when it is too large for memory, in overlapping latent tiles whose
outputs are blended with Gaussian weights (:func:`decode_tiled`). Works for any number of spatial axes; tensors
are ``(B, C, *spatial)``.
"""

from __future__ import annotations

import itertools
import sys
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.errors import MedsynthError

Size = Union[int, Sequence[int]]
Device = Union[torch.device, str, None]


def progress_bar(iterable: Optional[Iterable], enabled: Optional[bool], desc: str, unit: str = "it",
                 total: Optional[int] = None):
    """A tqdm progress bar on stderr over ``iterable`` (``None``: updated by hand): ``enabled=None`` shows it only
    when stderr is a terminal, ``True`` always (logs keep each finished bar as a line), ``False`` never (a disabled
    bar, which costs nothing)."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    show = terminal if enabled is None else bool(enabled)
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=not terminal, file=sys.stderr, dynamic_ncols=True,
                disable=not show)


def _per_axis(value: Size, spatial_dims: int, name: str) -> tuple[int, ...]:
    sizes = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(sizes) != spatial_dims or min(sizes) < 1:
        raise MedsynthError(f"{name} must be a positive int or {spatial_dims} positive ints, got {value}")
    return sizes


def _check_input(x: Tensor, name: str) -> int:
    if x.ndim < 3:
        raise MedsynthError(f"{name} must be (B, C, *spatial), got shape {tuple(x.shape)}")
    return x.ndim - 2


def encode_patchwise(
    encode: Callable[[Tensor], Tensor],
    x: Tensor,
    patch_size: Size,
    factor: int,
    batch: int = 1,
    pad_value: float = -1.0,
    device: Device = None,
) -> Tensor:
    """Encode ``x`` in non-overlapping patches and stitch the patch latents into one latent (PatchVolume encoding).

    ``x`` is padded at the end of each axis with ``pad_value`` (default -1, the background of data scaled to
    [-1, 1]; a constant background rather than replicated edges, so the padding looks like the empty space around
    a body) to a multiple of the patch size. A patch side longer than the image side rounded up to a multiple of
    ``factor`` is shortened to that, so a small image is encoded whole instead of being padded to a full patch.

    This stays a patch grid rather than MONAI's ``sliding_window_inference`` (which :func:`decode_tiled` uses): the
    encoder must see exactly the non-overlapping patches it was trained on, each latent voxel coming from one patch.
    MONAI's windows overlap where the size is not a multiple of the patch (the last window is shifted back, not
    padded) and their outputs are averaged, which yields latents no patch encodes to; it pads only inputs smaller
    than a window, and then on both sides, where PatchVolume pads at the end with background.

    Args:
        encode: maps patches ``(N, C, *patch)`` to latents ``(N, L, *patch / factor)`` (e.g. ``net.encode``).
        x: images ``(B, C, *spatial)``, 2 or 3 spatial axes.
        patch_size: patch side(s) in voxels; each a multiple of ``factor`` (e.g. 64, the training patch size).
        factor: the encoder's downsampling per axis.
        batch: patches per ``encode`` call (each call sees ``batch * B`` patches).
        pad_value: value of the padding, in the units of ``x``.
        device: where ``encode`` runs (patches are moved there and the latents back); default ``x``'s device.

    Returns:
        The latent ``(B, L, *padded / factor)`` on ``x``'s device, in ``encode``'s output dtype; ``padded`` is the
        padded size, so the first ``ceil(spatial / factor)`` latent voxels per axis cover the image.
    """
    spatial_dims = _check_input(x, "x")
    patch = _per_axis(patch_size, spatial_dims, "patch_size")
    if factor < 1 or any(p % factor for p in patch):
        raise MedsynthError(f"patch_size {patch} must be a multiple of the downsample factor {factor} per axis")
    if batch < 1:
        raise MedsynthError(f"batch must be positive, got {batch}")
    spatial = tuple(x.shape[2:])
    patch = tuple(min(p, -(-s // factor) * factor) for p, s in zip(patch, spatial))
    padded = tuple(-(-s // p) * p for s, p in zip(spatial, patch))
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(padded)):  # F.pad lists the last axis first
        pad += [0, t - s]
    x = F.pad(x, pad, mode="constant", value=pad_value) if any(pad) else x  # (B, C, *padded)

    starts = itertools.product(*(range(0, t, p) for t, p in zip(padded, patch)))
    slices = [tuple(slice(o, o + p) for o, p in zip(start, patch)) for start in starts]
    b = x.shape[0]
    latent_patch = tuple(p // factor for p in patch)
    out: Optional[Tensor] = None
    for i in range(0, len(slices), batch):
        group = slices[i : i + batch]
        patches = torch.cat([x[(..., *s)] for s in group]).to(device or x.device)  # (n * B, C, *patch)
        z = encode(patches)  # (n * B, L, *patch / factor)
        if tuple(z.shape[2:]) != latent_patch:
            raise MedsynthError(
                f"encode maps a patch {patch} to {tuple(z.shape[2:])}, expected {latent_patch} for factor {factor}"
            )
        z = z.to(x.device)
        if out is None:
            out = z.new_empty(b, z.shape[1], *(t // factor for t in padded))  # (B, L, *padded / factor)
        for j, s in enumerate(group):
            latent_slice = tuple(slice(sl.start // factor, sl.stop // factor) for sl in s)
            out[(..., *latent_slice)] = z[j * b : (j + 1) * b]
    assert out is not None
    return out


def _gaussian_weights(shape: Sequence[int], device: torch.device) -> Tensor:
    """Separable Gaussian blending weights ``(*shape)`` peaking at the centre (sigma = side / 8, floor 1e-3 per axis)."""
    weights = torch.ones((), device=device)
    for n in shape:
        centre = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        profile = torch.exp(-0.5 * (centre / (0.125 * n)) ** 2).clamp_min(1e-3)
        weights = weights[..., None] * profile
    return weights


def decode_tiled(
    decode: Callable[[Tensor], Tensor],
    z: Tensor,
    tile: Size,
    factor: int,
    overlap: float = 0.25,
    batch: int = 1,
    device: Device = None,
    progress: Optional[bool] = False,
) -> Tensor:
    """Decode latent ``z`` in overlapping latent tiles blended with Gaussian weights, in bounded memory.

    MONAI's ``sliding_window_inference`` (``mode="gaussian"``, as MAISI decodes) places the tiles and accumulates
    the blend: tiles step by ``int(tile * (1 - overlap))`` latent voxels, the last one flush with the end; each
    output voxel is the weighted mean of the tiles covering it, with weights that fall off towards a tile's border,
    where a decoder lacks context. The weights are a Gaussian of the *output* tile (sigma = side / 8), not MONAI's
    Gaussian of the latent tile upsampled by nearest neighbour (which would blend in blocks of ``factor`` voxels).
    If ``z`` fits in one tile it is decoded directly. Memory: one ``batch`` of tiles on ``device`` plus two
    output-sized float32 accumulators on ``z``'s device. For inference: the blend multiplies the decoder's output
    in place.

    Args:
        decode: maps latents ``(N, L, *tile)`` to images ``(N, C, *tile * factor)`` (e.g. ``net.decode``).
        z: latent ``(B, L, *latent_spatial)``.
        tile: latent tile side(s) in latent voxels (shortened to the latent size where larger).
        factor: the decoder's upsampling per axis.
        overlap: fraction of a tile side shared with the next tile, in [0, 1).
        batch: tiles per ``decode`` call (each call sees up to ``batch * B`` tiles).
        device: where ``decode`` runs (tiles are moved there and outputs back); default ``z``'s device.
        progress: a progress bar over the tiles on stderr (``None``: only when stderr is a terminal).

    Returns:
        The image ``(B, C, *latent_spatial * factor)``, float32, on ``z``'s device.
    """
    from monai.data.utils import dense_patch_slices
    from monai.inferers import sliding_window_inference

    spatial_dims = _check_input(z, "z")
    tiles = _per_axis(tile, spatial_dims, "tile")
    if not 0.0 <= overlap < 1.0:
        raise MedsynthError(f"overlap must be in [0, 1), got {overlap}")
    if factor < 1 or batch < 1:
        raise MedsynthError(f"factor and batch must be positive, got {factor} and {batch}")
    latent = tuple(z.shape[2:])
    tiles = tuple(min(t, s) for t, s in zip(tiles, latent))  # never padded: MONAI would pad a latent smaller
    if tiles == latent:
        return decode(z.to(device or z.device)).to(z.device, torch.float32)

    out_tile = tuple(t * factor for t in tiles)
    weights = _gaussian_weights(out_tile, torch.device(device or z.device))[None, None]  # (1, 1, *tile * factor)
    intervals = [t if t == s else max(1, int(t * (1 - overlap))) for t, s in zip(tiles, latent)]  # MONAI's
    count = len(dense_patch_slices(latent, tiles, intervals)) * z.shape[0]
    bar = progress_bar(None, progress, "decoding tiles", "tile", total=count)

    def decode_counted(tiles_in: Tensor) -> Tensor:
        images = decode(tiles_in)
        if tuple(images.shape[2:]) != out_tile:
            raise MedsynthError(
                f"decode maps a latent tile {tiles} to {tuple(images.shape[2:])}, expected {out_tile} for factor {factor}"
            )
        bar.update(tiles_in.shape[0])
        return images.float()

    try:
        return sliding_window_inference(
            z.float(), tiles, batch * z.shape[0], decode_counted, overlap=overlap, mode="gaussian",
            sw_device=device or z.device, device=z.device,
            process_fn=lambda out, window, importance: (out, weights),  # the output-resolution Gaussian above
        )
    finally:
        bar.close()


def reconstruct(
    net: nn.Module,
    x: Tensor,
    patch_size: Size,
    decode_tile: Optional[Size] = None,
    overlap: float = 0.25,
    batch: int = 1,
    device: Device = None,
) -> Tensor:
    """Reconstruct images of any size with an autoencoder: patch-wise encoding, joint or tiled decoding, crop.

    Gradients flow unless the caller wraps this in ``torch.no_grad()`` (stage 2 trains the decoder through it).

    Args:
        net: an autoencoder following the protocol of :mod:`medsynth.nets.autoencoders` (``encode``, ``decode``,
            ``downsample_factor``).
        x: images ``(B, C, *spatial)``, any sizes (padded with -1 for encoding and cropped back).
        patch_size: encoder patch side(s) in voxels, multiples of ``net.downsample_factor``.
        decode_tile: latent tile side(s) for :func:`decode_tiled`; ``None`` decodes the whole latent at once (the
            3D MedDiffusion joint decoding: no seams, but memory grows with the volume).
        overlap: tile overlap fraction for tiled decoding.
        batch: patches (and tiles) per ``encode`` (``decode``) call.
        device: where the net runs; default ``x``'s device.

    Returns:
        The reconstruction ``(B, C, *spatial)``, float32, on ``x``'s device.
    """
    factor = int(net.downsample_factor)
    z = encode_patchwise(net.encode, x, patch_size, factor, batch=batch, device=device)  # (B, L, *padded / f)
    if decode_tile is None:
        image = net.decode(z.to(device or z.device)).to(x.device, torch.float32)  # (B, C, *padded)
    else:
        image = decode_tiled(net.decode, z, decode_tile, factor, overlap=overlap, batch=batch, device=device)
    return image[(..., *(slice(0, s) for s in x.shape[2:]))]  # (B, C, *spatial)
