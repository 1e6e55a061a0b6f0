"""The latent manifest, ``latents.json``: the one file that joins the encoding stage to latent diffusion.

Written by :class:`~medsynth.writers.LatentWriter` (``medsynth predict`` of an autoencoder with
``predict_output: latent``) through :func:`latent_manifest`, read by
:class:`~medsynth.data.latents.LatentDataModule` through :func:`read_latent_manifest`. This module is the format's
only definition: its keys and their meaning (:class:`LatentManifest`, :class:`LatentRecord`, :class:`LatentScaling`,
:class:`LatentAutoencoder`), its version, and the checks a manifest passes before any latent is used.

Keys marked optional may be absent: manifests written before they were recorded still read (their generated
volumes then stay in [-1, 1], with identity directions). A manifest of a later :data:`LATENT_MANIFEST_VERSION` is
refused rather than half understood.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Optional, Sequence, TypedDict

import numpy as np
import torch

import medsynth
from medsynth.data.base import SPLITS, resolve_listed_path
from medsynth.data.manifest import load_json
from medsynth.errors import DataError
from medsynth.io import check_complete, read_npy

LATENT_MANIFEST = "latents.json"
"""The manifest's file name, in the folder that holds ``latents/`` (and ``masks/``)."""
LATENT_MANIFEST_KIND = "medsynth latents"
"""The value of ``kind`` that marks a JSON file as a latent manifest."""
LATENT_MANIFEST_VERSION = 1
"""The format's version (``version``); a manifest without one is version 1."""
SCALING_METHODS = ("minmax", "std")
"""How latents are scaled: ``minmax`` maps the dataset's range onto [-1, 1] (sampling may clamp to it), ``std``
standardises to mean 0 and standard deviation 1 (unbounded)."""


class LatentScaling(TypedDict):
    """``scaling``: what makes raw latents ``z`` the model's inputs, ``(z - shift) * scale``, over every latent
    written (all ranks)."""

    method: str
    """One of :data:`SCALING_METHODS` (optional on reading; ``minmax`` when absent)."""
    shift: float
    """Subtracted first (finite)."""
    scale: float
    """Multiplied after (finite, > 0)."""
    min: float
    """The smallest raw latent value (information)."""
    max: float
    """The largest raw latent value (information)."""


class LatentAutoencoder(TypedDict, total=False):
    """``autoencoder``: the model that encoded the latents and decodes samples (from
    ``AutoencoderModule.latent_description``)."""

    checkpoint: Optional[str]
    """Its checkpoint file."""
    sha256: Optional[str]
    """The checkpoint's SHA-256: a latent model refuses to decode with another file."""
    class_path: str
    """Its net's class."""
    spatial_dims: int
    """2 or 3."""
    latent_channels: int
    """Channels of every latent (checked against the files)."""
    downsample_factor: int
    """Image voxels per latent voxel, per axis."""
    patch_size: int
    """The side of the patches images were encoded in."""


class LatentRecord(TypedDict, total=False):
    """One entry of ``records``: an encoded image or volume. Paths are relative to the manifest's folder (and may
    not leave it) or absolute."""

    latent: str
    """The ``.npy`` file, float32 ``(latent_channels, *spatial / f)``, unscaled (required)."""
    name: str
    """The input's name without suffix, no ``/`` (required; the split hash and sample names use it)."""
    shape: list[int]
    """The latent's shape, checked against the file (read from it when absent)."""
    image_shape: list[int]
    """The encoded input's spatial shape, before padding to the patch (a mask must have it)."""
    source: str
    """The input file."""
    split: str
    """One of ``train``, ``val``, ``test``; absent: chosen by a hash of ``name``."""
    label: int
    """The class label, an integer >= 0."""
    affine: list[list[float]]
    """The source volume's 4x4 affine (spacing, directions and origin of generated volumes)."""
    intensity_range: list[float]
    """The intensities ``[low, high]`` that -1 and 1 stood for in this volume."""
    mask: str
    """The input's mask at image resolution: a PNG (2D) or the volume's NIfTI label map (3D)."""
    mask_source: str
    """The mask file it was copied from."""
    scaling: LatentScaling
    """The manifest's scaling, repeated: records merged from two encodings are refused."""
    autoencoder_sha256: Optional[str]
    """The manifest's autoencoder SHA-256, repeated for the same reason."""


class LatentManifest(TypedDict, total=False):
    """The whole ``latents.json``."""

    kind: str
    """:data:`LATENT_MANIFEST_KIND` (required)."""
    version: int
    """:data:`LATENT_MANIFEST_VERSION` when written (optional: 1)."""
    scaling: LatentScaling
    """Required."""
    autoencoder: LatentAutoencoder
    """Required (may be empty in hand-written manifests)."""
    class_names: Optional[list[str]]
    """The names of the class labels, or ``None`` (``"0"``, ``"1"``, ... when records carry labels)."""
    intensity: dict
    """Optional, volumes: how intensities were normalised (``Normalization.describe``: ``mode``, ``units``,
    ``low`` < ``high`` finite, ...); generated volumes are written back in these units."""
    geometry: dict
    """Optional, volumes: how they were read (``Geometry.describe``: ``target_spacing``, ``canonical``)."""
    num_classes: int
    """Optional: mask classes counting background, when the inputs had masks."""
    records: list[LatentRecord]
    """At least one."""
    created: str
    """When it was written (ISO 8601, UTC)."""
    versions: dict
    """The medsynth and torch versions that wrote it."""


def latent_scaling(method: str, low: float, high: float, count: float, total: float, squares: float) -> LatentScaling:
    """The ``scaling`` entry for latents whose values span ``[low, high]``, with ``count`` values of sum ``total``
    and sum of squares ``squares``.

    Raises:
        ValueError: ``method`` is not one of :data:`SCALING_METHODS`.
    """
    if method == "minmax":
        shift, scale = (high + low) / 2, 2.0 / max(high - low, 1e-8)
    elif method == "std":
        mean = total / count
        shift, scale = mean, 1.0 / max((squares / count - mean * mean) ** 0.5, 1e-8)
    else:
        raise ValueError(f"latent scaling {method!r}: expected one of {', '.join(SCALING_METHODS)}")
    return {"method": method, "shift": shift, "scale": scale, "min": low, "max": high}


def latent_manifest(records: Sequence[LatentRecord], scaling: LatentScaling, autoencoder: LatentAutoencoder,
                    class_names: Optional[list[str]] = None, intensity: Optional[dict] = None,
                    geometry: Optional[dict] = None, num_classes: int = 0) -> LatentManifest:
    """The manifest of ``records`` (sorted by name; each given the manifest's scaling and autoencoder SHA-256)."""
    volumes: dict = {}
    if intensity is not None:
        volumes["intensity"] = intensity
    if geometry is not None:
        volumes["geometry"] = geometry
    if num_classes:  # what mask-guided training reads its one-hot channel count from (data.num_classes null)
        volumes["num_classes"] = int(num_classes)
    # each record names its scaling and encoder too, so records merged from several encodings are caught
    stamped = [dict(r, scaling=scaling, autoencoder_sha256=autoencoder.get("sha256")) for r in records]
    return {
        "kind": LATENT_MANIFEST_KIND,
        "version": LATENT_MANIFEST_VERSION,
        "scaling": scaling,
        "autoencoder": autoencoder,
        "class_names": class_names,
        **volumes,
        "records": sorted(stamped, key=lambda r: r["name"]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"medsynth": medsynth.__version__, "torch": torch.__version__},
    }


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _check_header(path: Path, raw: object) -> None:
    """Check what the manifest says about all its latents (kind, version, scaling, autoencoder, intensity)."""
    if not isinstance(raw, dict) or raw.get("kind") != LATENT_MANIFEST_KIND:
        raise DataError(f"{path}: not a latent manifest (write one with `medsynth predict --config configs/encode3d.yaml`)")
    version = raw.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= LATENT_MANIFEST_VERSION:
        raise DataError(f"{path}: latent manifest version {version!r}; this medsynth reads versions up to "
                        f"{LATENT_MANIFEST_VERSION} (update medsynth, or encode the latents again)")
    scaling, ae = raw.get("scaling") or {}, raw.get("autoencoder") or {}
    if not isinstance(scaling, dict) or not isinstance(ae, dict):
        raise DataError(f"{path}: latent manifest with a malformed 'scaling' or 'autoencoder' entry")
    if not all(_number(scaling.get(k)) for k in ("shift", "scale")) or not scaling["scale"] > 0:
        raise DataError(f"{path}: latent manifest without a valid scaling (shift, scale > 0)")
    if scaling.get("method", "minmax") not in SCALING_METHODS:
        raise DataError(f"{path}: latent manifest scaling method {scaling['method']!r}; expected one of "
                        f"{', '.join(SCALING_METHODS)}")
    intensity = raw.get("intensity")
    if intensity is not None and (not isinstance(intensity, dict) or ("low" in intensity) != ("high" in intensity)
                                  or "low" in intensity and not _finite_range(intensity["low"], intensity["high"])):
        raise DataError(f"{path}: latent manifest with a malformed 'intensity' (need finite low < high)")


def read_latent_manifest(path: str | Path) -> LatentManifest:
    """Read and check a latent manifest; record paths become absolute, every record has its latent's ``shape``.

    Raises:
        DataError: one line naming the file: not a latent manifest, a later version, a malformed scaling or
            intensity, a missing latent file, latents that disagree in channel count or dimensionality, or
            records made by another autoencoder or scaling than the manifest names.
    """
    path = Path(path)
    raw = load_json(path, "latent manifest")
    _check_header(path, raw)
    scaling, ae = raw.get("scaling") or {}, raw.get("autoencoder") or {}
    records = raw.get("records")
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: latent manifest lists no latents")
    check_complete(Path(os.path.abspath(path.parent)))
    channels = ae.get("latent_channels")
    shapes, files = [], {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("latent"), str):
            raise DataError(f"{path}: record {i} has no 'latent' file")
        for key in ("scaling", "autoencoder_sha256"):  # per-record values (merged manifests) must agree
            if key in rec and rec[key] != (scaling if key == "scaling" else ae.get("sha256")):
                raise DataError(f"{path}: record {i} ({rec['latent']}) was made with another {key.replace('_', ' ')} "
                                "than the manifest's; encode all volumes with one autoencoder run")
        file = resolve_listed_path(path, rec["latent"], f"record {i}")
        if not file.is_file():
            raise DataError(f"{file}: latent file listed in {path} does not exist")
        if file in files:
            raise DataError(f"{path}: record {i} lists {rec['latent']} again (record {files[file]}); each latent "
                            "belongs to one record")
        files[file] = i
        shape = read_npy(file, "latent", mmap=True).shape
        if len(shape) < 2 or 0 in shape:
            raise DataError(f"{file}: latent of shape {list(shape)}; expected (C, *spatial)")
        if list(rec.get("shape", shape)) != list(shape):
            raise DataError(f"{file}: latent of shape {list(shape)} but {path} records {rec.get('shape')}")
        if channels is not None and shape[0] != channels:
            raise DataError(f"{file}: {shape[0]} latent channels, but the manifest's autoencoder has {channels}")
        if shapes and (shape[0] != shapes[0][0] or len(shape) != len(shapes[0])):
            raise DataError(f"{file}: latent of shape {list(shape)} disagrees with {list(shapes[0])} in channels or "
                            "dimensions")
        if rec.get("split", "train") not in SPLITS:
            raise DataError(f"{path}: record {i} has split '{rec['split']}'; expected one of {', '.join(SPLITS)}")
        name, shape_listed = rec.get("name"), rec.get("shape", [])
        if not isinstance(name, str) or not name or "/" in name or not isinstance(shape_listed, list):
            raise DataError(f"{path}: record {i} has a missing or malformed 'name', or a malformed 'shape'")
        if "label" in rec and (not isinstance(rec["label"], int) or isinstance(rec["label"], bool) or rec["label"] < 0):
            raise DataError(f"{path}: record {i} label {rec['label']!r} is not an integer >= 0")
        rec = dict(rec, latent=str(file), shape=list(shape))
        if rec.get("mask"):
            rec["mask"] = str(resolve_listed_path(path, rec["mask"], f"record {i} mask"))
        records[i] = rec
        shapes.append(shape)
    return raw


def _finite_range(low: object, high: object) -> bool:
    return _number(low) and _number(high) and low < high
