"""JSON manifests of 2D examples, an alternative to the folder layout.

Two forms are accepted; relative paths resolve against the manifest's folder::

    [{"image": "img/a.png", "mask": "seg/a.png", "split": "train"}, ...]
    {"train": [{"image": "img/a.png", "mask": "seg/a.png"}, ...], "val": [...], "test": [...]}

``mask`` is optional (unconditional data); a test record may have a ``mask`` and no ``image`` (sampling only).
Relative paths must stay inside the manifest's folder (``../`` out of it is refused); absolute paths are taken as
they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medsynth.data.image2d import SPLITS, ImageRecord
from medsynth.errors import DataError


def load_json(path: str | Path, what: str):
    """Parse a JSON file the user gave, or fail with one line naming it (``what``: 'manifest', 'class map')."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc})".replace("\n", " ")) from None


def read_manifest(path: str | Path) -> list[ImageRecord]:
    """Read and check a manifest; every record gets absolute paths.

    Raises:
        DataError: missing or malformed manifest, a record without ``image``/``mask``, an unknown split.
    """
    path = Path(path)
    raw = load_json(path, "manifest")
    if isinstance(raw, dict):
        entries = []
        for split, items in raw.items():
            if not isinstance(items, list):
                raise DataError(f"{path}: manifest key '{split}' must hold a list of records")
            entries += [dict(item, split=split) if isinstance(item, dict) else item for item in items]
    elif isinstance(raw, list):
        entries = raw
    else:
        raise DataError(f"{path}: manifest must be a list of records or a mapping split -> records")
    root = Path(os.path.abspath(path.parent))

    def resolve(rel, i: int) -> Path:
        if not isinstance(rel, str):
            raise DataError(f"{path}: record {i} path {rel!r} is not a string")
        p = Path(rel)
        if p.is_absolute():
            return p
        full = Path(os.path.normpath(root / p))  # lexical: a symlink the user placed inside is fine
        if not full.is_relative_to(root):
            raise DataError(f"{path}: record {i} path '{rel}' leaves the manifest's folder; use an absolute path")
        return full

    records = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: record {i} is not an object")
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise DataError(f"{path}: record {i} has split '{split}'; expected one of {', '.join(SPLITS)}")
        image = resolve(entry["image"], i) if entry.get("image") else None
        mask = resolve(entry["mask"], i) if entry.get("mask") else None
        if image is None and mask is None:
            raise DataError(f"{path}: record {i} names neither 'image' nor 'mask'")
        name = (image or mask).name
        records.append(ImageRecord(name=name, split=split, image=image, mask=mask))
    return records
