"""Turning tensors into viewable pictures: intensity to 8-bit, masks to colours, grids."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

# Background black, then distinct colours (Okabe-Ito palette, readable with colour-blindness).
PALETTE = np.array(
    [[0, 0, 0], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178], [213, 94, 0],
     [204, 121, 167], [255, 255, 255]],
    dtype=np.uint8,
)


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image ``(C, H, W)`` in [-1, 1] as uint8 ``(H, W)`` (1 channel), ``(H, W, 3)`` (3), or its first channel."""
    x = np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if x.ndim == 3:
        x = np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x[0]
    return (np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def colorize_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """An integer mask ``(H, W)`` as RGB uint8 ``(H, W, 3)``; classes beyond the palette cycle through it."""
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.int64)
    colours = np.concatenate([PALETTE[:1], PALETTE[1:][(np.arange(max(m.max(), 1)) % (len(PALETTE) - 1))]])
    return colours[m]


def as_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile rows of equally sized uint8 pictures into one RGB picture with ``pad`` white pixels between them."""
    rows = [[as_rgb(a) for a in row] for row in rows if len(row)]
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, a in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = a
    return out


def pad_to(a: np.ndarray, size: int) -> np.ndarray:
    """Centre a picture ``(H, W[, 3])`` on a black ``size`` x ``size`` canvas (cropping what does not fit)."""
    h, w = a.shape[:2]
    out = np.zeros((size, size, *a.shape[2:]), dtype=a.dtype)
    ys, xs = max((size - h) // 2, 0), max((size - w) // 2, 0)
    ya, xa = max((h - size) // 2, 0), max((w - size) // 2, 0)
    hh, ww = min(h, size), min(w, size)
    out[ys : ys + hh, xs : xs + ww] = a[ya : ya + hh, xa : xa + ww]
    return out


def orthogonal_slices(volume: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """The three orthogonal mid-slices of a volume ``(C, X, Y, Z)`` in [-1, 1] as uint8 pictures of one square
    size (first channel; each slice rotated so the second in-plane axis points up, as viewers show it)."""
    v = np.asarray(volume.detach().float().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    v = v[0] if v.ndim == 4 else v
    x, y, z = (s // 2 for s in v.shape)
    slices = [v[x, :, :], v[:, y, :], v[:, :, z]]  # sagittal, coronal, axial
    views = [np.rot90(to_uint8(s[None])) for s in slices]
    size = max(max(s.shape[:2]) for s in views)
    return [pad_to(np.ascontiguousarray(s), size) for s in views]


def picture_rows(x: torch.Tensor) -> list[list[np.ndarray]]:
    """A batch ``(B, C, *spatial)`` in [-1, 1] as rows of uint8 pictures, 2D or 3D alike: images make one row of
    ``B`` pictures, volumes one row per volume of its three orthogonal mid-slices."""
    if x.ndim == 5:
        return [orthogonal_slices(v) for v in x]
    return [[to_uint8(a) for a in x]]


def bar_chart(values: dict[str, float], reference: Optional[dict[str, float]] = None, title: str = "",
              width: int = 480, bar_height: int = 18) -> np.ndarray:
    """Horizontal bars of scores in [0, 1] (e.g. per-class Dice), with an optional reference per bar (e.g. the
    real-image ceiling) drawn as a black tick; an RGB uint8 picture."""
    from PIL import Image, ImageDraw

    label_w, pad = 150, 6
    height = pad * 3 + 14 + len(values) * (bar_height + pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black")
    span = width - label_w - 60
    for i, (name, v) in enumerate(values.items()):
        y = pad * 2 + 14 + i * (bar_height + pad)
        draw.text((pad, y + 3), str(name)[:22], fill="black")
        v = float(v) if v == v else 0.0
        draw.rectangle([label_w, y, label_w + int(span * min(max(v, 0.0), 1.0)), y + bar_height],
                       fill=tuple(int(c) for c in PALETTE[1 + i % (len(PALETTE) - 2)]))
        draw.text((label_w + span + 6, y + 3), f"{v:.3f}", fill="black")
        if reference and name in reference:
            x = label_w + int(span * min(max(float(reference[name]), 0.0), 1.0))
            draw.rectangle([x - 1, y - 2, x + 1, y + bar_height + 2], fill="black")
    return np.asarray(img)
