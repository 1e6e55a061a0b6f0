"""Files in and out: atomic writing (a reader never sees a half-written file, and a killed run leaves none behind),
and one guarded reader per kind of file (a file that cannot be decoded is one line naming it)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from medsynth.errors import DataError, MedsynthError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through ``write(tmp_path)`` into a temporary name beside ``path``, then rename it into place.

    Args:
        path: final file path; its folder is created.
        write: called with the temporary path; must create the file there.

    Raises:
        MedsynthError: an ``OSError`` while writing, as one line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, read-only place, quota: one line naming the file
            raise write_error(path, exc) from None
        raise
    return path


def write_error(path: str | os.PathLike, exc: OSError) -> MedsynthError:
    """The one-line error for an ``OSError`` while writing ``path`` (disk full, read-only place, permissions)."""
    import errno

    hint = {errno.ENOSPC: "free space or choose another place", errno.EDQUOT: "free space or choose another place",
            errno.EACCES: "choose a place you can write to", errno.EPERM: "choose a place you can write to",
            errno.EROFS: "choose a place you can write to"}.get(exc.errno, "choose another place")
    return MedsynthError(f"{path}: cannot write ({exc.strerror or type(exc).__name__}); {hint}")


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


# ---------------------------------------------------------------------------------------------------- reading
# One guarded reader per kind of file. Decoders fail in many ways (Pillow raises SyntaxError, OSError,
# DecompressionBombError; numpy ValueError or tokenize.TokenError; gzip EOFError or zlib.error; torch.load
# RuntimeError or UnpicklingError): every failure to decode becomes one DataError line naming the file and what is
# wrong with it. Formats are judged by content as well as by suffix.

MAX_IMAGE_PIXELS = 1 << 28
"""Largest image (width x height) read; larger headers are refused before anything is decoded."""
MAX_VOLUME_BYTES = 1 << 35
"""Largest volume (32 GiB of voxels) read; a header claiming more is refused before anything is allocated."""
PIL_FORMATS = {".png": ("PNG",), ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".tif": ("TIFF",),
               ".tiff": ("TIFF",), ".bmp": ("BMP", "DIB")}
"""Pillow formats accepted for each image suffix (the content must match the suffix)."""
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP", "JPEG2000")
IMAGE_MODES = ("1", "L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F")
"""Pillow modes an image may have: grey or RGB(A), 8 or 16 bits (or 32-bit float)."""
LABEL_MAP_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I", "F")
"""Pillow modes a label map (mask) may have: one channel of integers (palette indices count)."""


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def content_kind(path: str | os.PathLike) -> str:
    """What a file holds, judged by its first bytes (not its name).

    Returns one of ``png``, ``jpeg``, ``gif``, ``tiff``, ``bmp``, ``webp``, ``npy``, ``gzip``, ``nifti``, ``zip``,
    ``pickle``, ``dicom`` (a DICOM Part 10 file: ``DICM`` after the 128-byte preamble), ``nrrd``, ``metaimage``
    (an ITK MetaImage header, ``.mha``/``.mhd``), ``json`` (text starting with ``{`` or ``[``), ``empty`` or
    ``unknown``.
    """
    with open(path, "rb") as f:
        head = f.read(352)
    signatures = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF8", "gif"), (b"II*\x00", "tiff"),
                  (b"MM\x00*", "tiff"), (b"BM", "bmp"), (b"\x93NUMPY", "npy"), (b"\x1f\x8b", "gzip"),
                  (b"PK\x03\x04", "zip"), (b"\x80", "pickle"))
    if not head:
        return "empty"
    for magic, kind in signatures:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "metaimage"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2"):
        return "nifti"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        return "json"
    return "unknown"


def _opened(path: Path, what: str) -> str:
    """The content kind of an existing, readable file, or a DataError saying why it cannot be read."""
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: {what} is a broken or looping symbolic link")
    if not path.exists():
        raise DataError(f"{path}: {what} file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: {what} is not a file")
    try:
        return content_kind(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or _first_line(exc)})") from None


def read_npy(path: str | os.PathLike, what: str = "array", mmap: bool = False) -> np.ndarray:
    """Read a ``.npy`` array (never a pickle), checking its header and length before any data is loaded.

    Args:
        path: the file.
        what: what the file is to the user (``image``, ``mask``, ``latent``, ``sample``), for messages.
        mmap: return a read-only memory map (only the header is read now): for a shape check.

    Raises:
        DataError: a missing file, content that is not ``.npy``, a damaged header, object (pickled) or structured
            data, a file shorter than its header says.
    """
    path = Path(path)
    kind = _opened(path, what)
    if kind != "npy":
        raise DataError(f"{path}: {what} is not a .npy file (its content is {kind})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # header and length checked; data left on disk
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, tokenize.TokenError, ...
        if "Python objects" in str(exc) or "allow_pickle" in str(exc):
            raise DataError(f"{path}: {what} holds pickled Python objects; save a numeric array") from None
        raise DataError(f"{path}: unreadable .npy {what} ({_first_line(exc)})") from None
    if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.subdtype is not None:
        raise DataError(f"{path}: {what} has dtype {arr.dtype}; expected a plain numeric array")
    if mmap:
        return arr
    try:
        out = np.array(arr)
    except Exception as exc:  # noqa: BLE001 - an I/O error while paging the data in
        raise DataError(f"{path}: unreadable .npy {what} ({_first_line(exc)})") from None
    del arr
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))


def read_image_file(path: str | os.PathLike, what: str = "image", label_map: bool = False) -> np.ndarray:
    """Read a 2D image or label map as stored: ``(H, W)`` or ``(H, W, C)`` (Pillow) or any ``.npy`` array.

    Pillow files (``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``, ``.bmp``) must hold what their suffix says.
    Images are grey or RGB(A), 8 or 16 bits (palette images are refused: their values are indices). Label maps
    (``label_map``) must be lossless single-channel integers: JPEG and other lossy formats are refused.

    Raises:
        DataError: one line naming the file: missing, of another format than its suffix, undecodable (truncated,
            corrupt chunk, a header claiming too many pixels), or of an unsupported kind.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path, what)
    kind = _opened(path, what)
    formats = PIL_FORMATS.get(suffix)
    if formats is None:
        raise DataError(f"{path}: {what} has suffix '{suffix}'; expected {', '.join([*PIL_FORMATS, '.npy'])}")
    if kind in ("npy", "gzip", "zip", "pickle", "json", "nifti", "empty"):
        raise DataError(f"{path}: {what} is named {suffix} but its content is {kind}")
    if kind == "png":
        with open(path, "rb") as f:
            ihdr = f.read(26)
        if len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in (2, 6):  # Pillow would read 16-bit colour as 8 bits
            raise DataError(f"{path}: {what} is a 16-bit colour PNG, which is read as 8 bits; store it as .npy (or "
                            "as 16-bit grey)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format in LOSSY_FORMATS and label_map:
                    raise DataError(f"{path}: {what} is {im.format}, a lossy format that alters labels; store label "
                                    "maps as PNG or .npy")
                if im.format not in formats:
                    raise DataError(f"{path}: {what} is named {suffix} but its content is {im.format or kind}")
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: {what} claims {im.width}x{im.height} pixels, more than the "
                                    f"{MAX_IMAGE_PIXELS} read safely")
                mode = im.mode
                if mode not in (LABEL_MAP_MODES if label_map else IMAGE_MODES):
                    if mode == "P":
                        raise DataError(f"{path}: {what} is a palette (indexed-colour) image whose values are palette "
                                        "indices, not intensities; save it as grey or RGB")
                    expected = "a single-channel label map of integers" if label_map else "grey or RGB, 8 or 16 bits"
                    raise DataError(f"{path}: {what} has Pillow mode {mode}; expected {expected}")
                if getattr(im, "n_frames", 1) > 1:
                    raise DataError(f"{path}: {what} holds {im.n_frames} frames; expected one 2D image")
                compression = str(im.info.get("compression", ""))
                if label_map and "jpeg" in compression.lower():
                    raise DataError(f"{path}: {what} is JPEG-compressed TIFF, which alters labels; store it lossless")
                im.load()
                arr = np.asarray(im)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {what} claims more pixels than are read safely ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, OSError, ValueError, struct.error, ...
        raise DataError(f"{path}: unreadable {what} ({_first_line(exc)})") from None
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    elif mode == "I" and not label_map:
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"{path}: {what} holds 32-bit values outside 0..65535; expected 8 or 16 bits")
        arr = arr.astype(np.uint16)
    return arr


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file the user gave, strictly: a key repeated within one object (JSON would keep only the last,
    silently dropping an entry), ``NaN``/``Infinity`` and text that is not UTF-8 are refused.

    Raises:
        DataError: one line naming the file: missing, not JSON (with line and column), a repeated key.
    """
    path = Path(path)
    _opened(path, what)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or _first_line(exc)})") from None

    class Refused(Exception):
        pass

    def unique(pairs: list) -> dict:
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise Refused(f"repeats the key {key!r} in one object (JSON keeps only the last); remove or rename "
                              "one")
            obj[key] = value
        return obj

    def constant(name: str):
        raise Refused(f"holds {name}, which is not JSON")

    try:
        return json.loads(text, object_pairs_hook=unique, parse_constant=constant)
    except Refused as exc:
        raise DataError(f"{path}: {what} {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                        f"{exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: {what} is nested too deeply") from None


def read_nifti(path: str | os.PathLike, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file (``.nii`` or ``.nii.gz``) as float32 voxels in the file's order and its ``(4, 4)`` affine.

    The content must match the suffix (gzip for ``.nii.gz``, a NIfTI header for ``.nii``); a header claiming more
    voxels than the file can hold (uncompressed) or than :data:`MAX_VOLUME_BYTES` is refused before reading.
    Scaling (``scl_slope``/``scl_inter``) is applied.

    Raises:
        DataError: one line naming the file: missing, of another format, corrupt or truncated, an empty axis.
    """
    import nibabel as nib

    path = Path(path)
    kind = _opened(path, what)
    gz = path.name.lower().endswith(".gz")
    if gz and kind != "gzip":
        raise DataError(f"{path}: {what} is named .nii.gz but is not gzip-compressed (its content is {kind})")
    if not gz and kind != "nifti":
        raise DataError(f"{path}: {what} is not a NIfTI file (its content is {kind})")
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        if 0 in shape:
            raise DataError(f"{path}: {what} {'x'.join(map(str, shape))} has an empty axis")
        nbytes = int(np.prod(shape, dtype=np.float64)) * img.get_data_dtype().itemsize
        if nbytes > MAX_VOLUME_BYTES:
            raise DataError(f"{path}: {what} header claims {'x'.join(map(str, shape))} voxels ({nbytes / 2**30:.0f} "
                            "GiB); a corrupt header?")
        if not gz and int(img.header.get_data_offset()) + nbytes > path.stat().st_size:
            raise DataError(f"{path}: {what} is truncated (its header claims {'x'.join(map(str, shape))} voxels)")
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip raise OSError, EOFError, zlib.error, ValueError, ...
        raise DataError(f"{path}: unreadable NIfTI {what} ({_first_line(exc)})") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: {what} has a non-finite affine (a corrupt header?)")
    return data, affine


ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}
"""Volume files read through SimpleITK (by torchio's conversion), with the content each suffix must hold."""


def _quietly(read: Callable[[], Any]) -> tuple[Any, Optional[Exception], str]:
    """Run ``read`` with the process's stdout and stderr (file descriptors 1 and 2) held: ITK and the format
    libraries under it print there (MetaIO on stdout), which would break the one-line refusal. Returns the result,
    the exception raised (or ``None``) and what was printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    error: Optional[Exception] = None
    result = None
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            result = read()
        except Exception as exc:  # noqa: BLE001 - handed back to the caller, which names the file
            error = exc
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        sink.seek(0)
        printed = sink.read().decode("utf-8", "replace")
    return result, error, printed


def _itk_problem(exc: BaseException, printed: str = "") -> str:
    """The most specific line of an ITK failure: what the format library printed, else the exception's last line
    (ITK puts the source file and object address first, the reason last)."""
    lines = [" ".join(line.split()) for line in printed.splitlines() if line.strip()]
    if not lines:
        lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        lines = lines[-1:]
    text = re.sub(r"^(?:\[\w+\] |(?:itk::|ITK )ERROR: \w+\(0x[0-9a-f]+\): )", "", lines[0])
    return text[:160]


def _dicom_tag(reader, tag: str) -> Optional[str]:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the one DICOM series in ``folder``, in slice order, after checking the folder holds exactly one
    complete series.

    Every file directly inside the folder (hidden ones skipped) must be a DICOM file of that series; slices must
    share one orientation and lie at distinct, evenly spaced positions along it, so a missing slice file (a gap of
    more than 1.5 times the usual spacing) is found instead of read as a thinner volume.

    Raises:
        DataError: one line naming the folder: empty, a file that is not DICOM, more than one series, a file GDCM
            cannot place in the series, one slice only, mixed orientations, two slices at one position, a gap.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    if not files:
        raise DataError(f"{folder}: DICOM series folder holds no files")
    for f in files:
        try:
            kind = content_kind(f)
        except OSError as exc:
            raise DataError(f"{folder}: cannot read {f.name} ({exc.strerror or _first_line(exc)})") from None
        if kind != "dicom":
            raise DataError(f"{folder}: DICOM series folder holds {f.name}, which is not a DICOM file (its content is "
                            f"{kind}); keep one series per folder and nothing else")
    series, _, _ = _quietly(lambda: sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    series = list(series or ())
    if len(series) != 1:
        raise DataError(f"{folder}: DICOM folder holds {len(series)} series ({', '.join(series[:3])}); give each "
                        "series its own folder" if series else f"{folder}: no readable DICOM series")
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    left = sorted({str(f) for f in files} - set(names))
    if left:
        raise DataError(f"{folder}: {Path(left[0]).name} is not part of the folder's DICOM series (damaged or of "
                        "another series?)")
    if len(names) < 2:
        raise DataError(f"{folder}: DICOM series of one slice; a volume needs at least 2")
    positions, orientations = [], set()
    reader = sitk.ImageFileReader()
    for name in names:
        reader.SetFileName(name)
        _, error, printed = _quietly(reader.ReadImageInformation)
        if error is not None:
            raise DataError(f"{folder}: unreadable DICOM file {Path(name).name} ({_itk_problem(error, printed)})")
        position, orientation = _dicom_tag(reader, "0020|0032"), _dicom_tag(reader, "0020|0037")
        if position is None or orientation is None:
            raise DataError(f"{folder}: {Path(name).name} has no slice position or orientation (tags 0020,0032 and "
                            "0020,0037)")
        try:
            positions.append([float(v) for v in position.split("\\")])
            orientations.add(tuple(round(float(v), 4) for v in orientation.split("\\")))
        except ValueError:
            raise DataError(f"{folder}: {Path(name).name} has a malformed slice position or orientation") from None
    if len(orientations) > 1:
        raise DataError(f"{folder}: DICOM slices of {len(orientations)} orientations; not one volume")
    row_col = np.asarray(next(iter(orientations)), dtype=np.float64).reshape(2, 3)
    depth = np.sort(np.asarray(positions) @ np.cross(row_col[0], row_col[1]))  # mm along the slice normal
    gaps = np.diff(depth)
    if gaps.min() < 1e-3:
        raise DataError(f"{folder}: two DICOM slices at one position ({depth[int(gaps.argmin())]:.2f} mm); a "
                        "duplicate file or two series in one folder")
    usual = float(np.median(gaps))
    if gaps.max() > 1.5 * usual:
        at = int(gaps.argmax())
        raise DataError(f"{folder}: DICOM series has a gap of {gaps[at]:.2f} mm between slices at {depth[at]:.2f} and "
                        f"{depth[at + 1]:.2f} mm (usual spacing {usual:.2f} mm): a missing slice file?")
    return names


def read_itk_volume(path: str | os.PathLike, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM series folder or an NRRD/MetaImage file (see :data:`ITK_SUFFIXES`) through SimpleITK and
    torchio's conversion, as :func:`read_nifti` reads NIfTI: float32 voxels ``(X, Y, Z)`` (``(X, Y, Z, C)`` for
    vector images) and the RAS ``(4, 4)`` affine in mm, so the result is what the same volume gives as NIfTI.

    DICOM intensities have the series' rescale slope and intercept applied (CT in Hounsfield units).

    Raises:
        DataError: one line naming the file or folder: missing, of another format than its suffix, a broken series
            (see :func:`dicom_series_files`), corrupt or truncated, too large.
    """
    import SimpleITK as sitk
    from torchio.data.io import sitk_to_nib

    path = Path(path)
    if path.is_dir():
        names = dicom_series_files(path)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        size = None
    else:
        kind = _opened(path, what)
        expected = ITK_SUFFIXES.get(path.suffix.lower())
        if expected is None:
            raise DataError(f"{path}: {what} has suffix '{path.suffix}'; expected .nii, .nii.gz, "
                            f"{', '.join(ITK_SUFFIXES)} or a DICOM series folder")
        if kind != expected:
            raise DataError(f"{path}: {what} is named {path.suffix} but its content is {kind}")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        _, error, printed = _quietly(reader.ReadImageInformation)
        if error is not None:
            raise DataError(f"{path}: unreadable {what} ({_itk_problem(error, printed)})")
        size = tuple(int(v) for v in reader.GetSize())
        nbytes = int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents() * 8
        if 0 in size or nbytes > MAX_VOLUME_BYTES:
            raise DataError(f"{path}: {what} header claims {'x'.join(map(str, size))} voxels; a corrupt header?")
    image, error, printed = _quietly(reader.Execute)  # ITK raises RuntimeError for every decoding failure
    if error is not None:
        raise DataError(f"{path}: unreadable {what} ({_itk_problem(error, printed)})")
    if image.GetDimension() == 2:
        raise DataError(f"{path}: {what} is a 2D image; expected a volume")
    data, affine = sitk_to_nib(image, keepdim=True)  # (C, X, Y, Z), RAS affine: torchio's reader
    data = np.asarray(data, dtype=np.float32)
    data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)  # the NIfTI layout read_nifti gives
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: {what} has a non-finite geometry (a corrupt header?)")
    return data, affine


@functools.lru_cache(maxsize=8)
def _zip_problem(path: str, size: int, mtime_ns: int) -> Optional[str]:
    """What is wrong with a zip-format checkpoint's records (``None`` if nothing): every record's header is read and
    its CRC-32 checked, so damage anywhere (also in tensors a memory-mapped load would not touch yet) is found before
    anything is built from the file. Cached per file version: a run checks its checkpoint several times."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    if info.CRC == 0 and info.file_size > 0:  # written without checksums: headers only
                        f.read(1)
                    else:
                        while f.read(1 << 24):
                            pass
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, OSError, ValueError, ...
        return f"damaged zip archive: {_first_line(exc)}"
    return None


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Load a PyTorch checkpoint safely (``weights_only``, memory-mapped, on the CPU).

    Raises:
        MedsynthError: one line naming the file: missing, not a PyTorch file, corrupt or truncated, not a dict.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise MedsynthError(f"{path}: {what} is a folder; give the checkpoint file (e.g. {path / 'last.ckpt'})")
    if not path.is_file():
        raise MedsynthError(f"{path}: {what} does not exist")
    try:
        kind = content_kind(path)
    except OSError as exc:
        raise MedsynthError(f"{path}: cannot read {what} ({exc.strerror or _first_line(exc)})") from None
    if kind not in ("zip", "pickle"):
        raise MedsynthError(f"{path}: not a PyTorch checkpoint (its content is {kind})")
    if kind == "zip":
        st = path.stat()
        problem = _zip_problem(os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if problem:
            raise MedsynthError(f"{path}: unreadable {what} ({problem})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise MedsynthError(f"{path}: unreadable {what} ({_first_line(exc)})") from None
    if not isinstance(ckpt, dict):
        raise MedsynthError(f"{path}: not a checkpoint written by `medsynth fit` (holds a {type(ckpt).__name__})")
    return ckpt


# ---------------------------------------------------------------------------------------------------- output folders
INCOMPLETE = "INCOMPLETE"
"""Marker file in an output folder while a run writes into it: it stays when the run fails, so a half-written folder
is never taken for a result, and its exclusive creation lets only one run claim a folder."""


def _marker_owner_alive(marker: Path) -> Optional[int]:
    """The pid of the live process on this host that holds ``marker``, or ``None`` (gone, another host, unreadable)."""
    import socket

    try:
        owner = json.loads(marker.read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except Exception:  # noqa: BLE001 - a marker we cannot read belongs to no live run we can know of
        return None
    if host != socket.gethostname() or pid == os.getpid():
        return pid if host != socket.gethostname() else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        return pid  # exists, owned by someone else
    return pid


class Claim(NamedTuple):
    """An output folder claimed by :func:`claim_output_dir`."""

    path: Path
    created: bool
    """The claim created the folder."""
    was_empty: bool
    """The folder held nothing before the claim."""


def claim_output_dir(path: str | os.PathLike, overwrite: bool, command: str = "medsynth") -> Claim:
    """Claim an output folder for one run, atomically, before anything is written into it.

    The folder is created (exclusively when new) and an :data:`INCOMPLETE` marker is created in it with
    ``O_EXCL``, so of two runs started on one folder only one passes. A non-empty folder needs ``overwrite``; a
    folder another live run is writing into is always refused; a marker left by a failed run is replaced only with
    ``overwrite``. :func:`release_output_dir` removes the marker when the results are complete.

    Args:
        path: the output folder.
        overwrite: allow writing into a non-empty folder (files of the same name are replaced).
        command: what claims it (written into the marker), e.g. ``medsynth predict``.

    Returns:
        The claim (for :func:`release_output_dir` or :func:`abandon_output_dir`).

    Raises:
        MedsynthError: one line naming the folder: not a folder, not empty, busy, incomplete, not writable.
    """
    import datetime as dt
    import socket

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedsynthError(f"{path}: output_dir exists and is not a folder")
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        path.mkdir()
        created = True
    except FileExistsError:
        if not path.is_dir():
            raise MedsynthError(f"{path}: output_dir exists and is not a folder") from None
    except OSError as exc:
        raise write_error(path, exc) from None
    marker = path / INCOMPLETE
    was_empty = created
    if not created:
        was_empty = not any(path.iterdir())
        if marker.exists():
            pid = _marker_owner_alive(marker)
            if pid is not None:
                raise MedsynthError(f"{path}: another medsynth run (pid {pid}) is writing into this folder; wait for "
                                    "it or choose another folder")
            if not overwrite:
                raise MedsynthError(f"{path}: holds the incomplete output of a run that failed ({INCOMPLETE}); choose "
                                    "another folder or pass --overwrite true to write over it")
            marker.unlink(missing_ok=True)
        elif any(path.iterdir()) and not overwrite:
            raise MedsynthError(f"{path}: output_dir is not empty; choose another folder or pass --overwrite true")
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        raise MedsynthError(f"{path}: another medsynth run is writing into this folder; wait for it or choose "
                            "another folder") from None
    except OSError as exc:
        raise write_error(marker, exc) from None
    with os.fdopen(fd, "w") as f:
        f.write(owner + "\n")
    return Claim(path, created, was_empty)


def release_output_dir(path: str | os.PathLike) -> None:
    """Mark a claimed output folder complete (remove its :data:`INCOMPLETE` marker)."""
    (Path(path) / INCOMPLETE).unlink(missing_ok=True)


def abandon_output_dir(claim: Claim) -> bool:
    """After a run failed: undo the claim when the folder held nothing before and the run wrote nothing but its
    resolved config, so a refusal leaves nothing behind; else leave the :data:`INCOMPLETE` marker, which says the
    folder is incomplete.

    Returns:
        Whether the claim was undone.
    """
    path = claim.path
    try:
        entries = {p.name for p in path.iterdir()}
    except OSError:
        return False
    if not claim.was_empty or not entries <= {INCOMPLETE, "config.yaml"}:
        return False
    for name in entries:
        (path / name).unlink(missing_ok=True)
    if claim.created:
        try:
            path.rmdir()
        except OSError:
            pass
    return True


def check_complete(folder: str | os.PathLike) -> None:
    """Refuse to read a folder another run is still writing, or one a failed run left incomplete.

    Raises:
        DataError: the folder holds an :data:`INCOMPLETE` marker.
    """
    marker = Path(folder) / INCOMPLETE
    if marker.exists():
        raise DataError(f"{folder}: incomplete output of a medsynth run that failed or is still running ({INCOMPLETE} "
                        "is there); run it again")
