"""JSON manifests of 2D examples, an alternative to the folder layout.

Two forms are accepted; relative paths resolve against the manifest's folder::

    [{"image": "img/a.png", "mask": "seg/a.png", "split": "train"}, ...]
    {"train": [{"image": "img/a.png", "mask": "seg/a.png"}, ...], "val": [...], "test": [...]}

``mask`` is optional (unconditional data); a test record may have a ``mask`` and no ``image`` (sampling only).
Relative paths must stay inside the manifest's folder (``../`` out of it is refused); absolute paths are taken as
they are.
"""

from __future__ import annotations

from pathlib import Path

from medsynth.data.base import SPLITS, resolve_listed_path
from medsynth.data.image2d import ImageRecord
from medsynth.errors import DataError
from medsynth.io import read_json

RECORD_KEYS = ("image", "mask", "split", "label")
"""Keys a 2D manifest record may have (``label`` is read by class-labelled data, ignored by mask-guided data)."""


def load_json(path: str | Path, what: str):
    """Parse a JSON file the user gave, or fail with one line naming it (``what``: 'manifest', 'class map').

    Strict: a key repeated in one object is refused (see :func:`medsynth.io.read_json`)."""
    return read_json(path, what)


def _file_identity(path: Path):
    """What makes two paths one file: its device and inode (links count), or ``None`` when it cannot be had."""
    try:
        st = path.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


def read_manifest(path: str | Path) -> list[ImageRecord]:
    """Read and check a manifest; every record gets absolute paths.

    Raises:
        DataError: missing or malformed manifest, a repeated key, a record without ``image``/``mask``, an unknown
            key or split, a file listed twice (a repeated record, or one image in two splits). Files are not
            read here (see ``SegGuidedImageDataModule.records``).
    """
    path = Path(path)
    raw = load_json(path, "manifest")
    if isinstance(raw, dict):
        entries = []
        for split, items in raw.items():
            if not isinstance(items, list):
                raise DataError(f"{path}: manifest key '{split}' must hold a list of records")
            for item in items:
                if isinstance(item, dict) and item.get("split", split) != split:
                    raise DataError(f"{path}: a record under '{split}' says split '{item['split']}'")
                entries.append(dict(item, split=split) if isinstance(item, dict) else item)
    elif isinstance(raw, list):
        entries = raw
    else:
        raise DataError(f"{path}: manifest must be a list of records or a mapping split -> records")

    def resolve(rel, i: int) -> Path:
        return resolve_listed_path(path, rel, f"record {i}")

    records, seen = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: record {i} is not an object")
        unknown = sorted(set(entry) - set(RECORD_KEYS))
        if unknown:
            raise DataError(f"{path}: record {i} has unknown key '{unknown[0]}' (expected {', '.join(RECORD_KEYS)})")
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise DataError(f"{path}: record {i} has split '{split}'; expected one of {', '.join(SPLITS)}")
        image = resolve(entry["image"], i) if entry.get("image") is not None else None
        mask = resolve(entry["mask"], i) if entry.get("mask") is not None else None
        if image is None and mask is None:
            raise DataError(f"{path}: record {i} names neither 'image' nor 'mask'")
        for file in (image, mask):
            if file is None:
                continue
            key = _file_identity(file)
            if key is not None and key in seen:
                j, other_split = seen[key]
                where = "again" if other_split == split else f"in split '{split}' and record {j} in '{other_split}'"
                raise DataError(f"{path}: record {i} lists {file} {where}" + (f" (record {j})" if where == "again"
                                else "") + "; each file belongs to one record of one split")
            seen[key] = (i, split)
        name = (image or mask).name
        records.append(ImageRecord(name=name, split=split, image=image, mask=mask))
    return records
