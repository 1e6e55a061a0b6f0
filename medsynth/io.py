"""Atomic file writing: a reader never sees a half-written file, and a killed run leaves none behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through ``write(tmp_path)`` into a temporary name beside ``path``, then rename it into place.

    Args:
        path: final file path; its folder is created.
        write: called with the temporary path; must create the file there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def free_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing is there yet, else the first free ``NAME.1.EXT``, ``NAME.2.EXT``, ...: a result that is
    written again never replaces the earlier one."""
    path = Path(path)
    stem, suffix, n = path.stem, path.suffix, 0
    while path.exists():
        n += 1
        path = path.with_name(f"{stem}.{n}{suffix}")
    return path


def save_png(path: str | os.PathLike, array: np.ndarray, text: Optional[dict[str, str]] = None) -> Path:
    """Save a uint8/uint16 array of shape (H, W), (H, W, 1) or (H, W, 3) as PNG, atomically, with ``text`` chunks."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    info = None
    if text:
        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", pnginfo=info))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save an array as ``.npy``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Save an object as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    return atomic_write(path, write)


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, descrip: Optional[str] = None) -> Path:
    """Save a 3D array (or 4D, channels last) as NIfTI-1 with ``affine``, atomically; ``.nii.gz`` is compressed.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``.
        array: voxel values in the file's voxel order, ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        affine: 4x4 voxel-to-world matrix (mm).
        descrip: the header's description field (at most 80 bytes; longer text is cut).
    """
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    if descrip is not None:
        image.header["descrip"] = descrip.encode()[:79]
    data = image.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)
