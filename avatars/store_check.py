"""What is wrong with an avatar's stored files, found cheaply and said exactly.

Files on disk may change under a server (another process, a full disk, an operator), so every
reader checks before it trusts: `meta_problem` looks at meta.json's fields, `files_problem` at
the data files of a "ready" avatar (npy headers against the file sizes, the zip directories of
the npz files: a few small reads, never the pixels). Both return None when nothing is wrong,
else a short reason naming the file ("frames.npy is truncated (...)"), which is what a client
is shown. `unpack_masks` checks the masks' packing while it unpacks them.
"""

from __future__ import annotations

import contextlib
import math
import threading
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import numpy as np
from numpy.lib import format as npy_format

from avatars.avatar import Avatar

# numpy parses every .npy header with ast.literal_eval, and CPython 3.11 can raise a spurious
# SystemError ("AST constructor recursion depth mismatch", python/cpython#106905) when two
# threads build ASTs at once. Every header this package parses is parsed under this lock.
NPY_HEADER_LOCK = threading.Lock()

STATUSES = ("pending", "preparing", "ready", "failed")
DATA_FILES = {
    "boxes.npz": ("face_boxes.npy", "crop_boxes.npy"),
    "masks.npz": ("data.npy", "shapes.npy"),
}


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def meta_problem(meta: Any, format_version: int) -> str | None:
    """What makes this meta.json unusable, or None."""
    if not isinstance(meta, dict):
        return "meta.json is not a JSON object"
    status = meta.get("status")
    if status not in STATUSES:
        return f"meta.json has no valid status ({str(status)[:20]!r})"
    if not isinstance(meta.get("name"), str):
        return "meta.json has no name"
    progress = meta.get("progress")
    if progress is not None and not _is_number(progress):
        return "meta.json has an invalid progress"
    if meta.get("error") is not None and not isinstance(meta.get("error"), str):
        return "meta.json has an invalid error"
    if status != "ready":
        return None
    version = meta.get("format_version")
    if version != format_version:
        shown = version if _is_int(version) else repr(str(version)[:10])
        return (
            f"stored in format version {shown}, and this lipstream reads "
            f"version {format_version}: add the avatar again"
        )
    n, size, fps = meta.get("n_frames"), meta.get("size"), meta.get("fps")
    if not _is_int(n) or n < 1:
        return "meta.json has an invalid n_frames"
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        return "meta.json has an invalid size"
    if not _is_number(fps) or fps <= 0:
        return "meta.json has an invalid fps"
    if not _is_int(meta.get("bbox_shift", 0)):
        return "meta.json has an invalid bbox_shift"
    key = meta.get("latents_key")
    if key is not None and not isinstance(key, str):
        return "meta.json has an invalid latents_key"
    return None


def read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype of the .npy file open at its start; `fh` is left at
    the first data byte. Raises ValueError (unknown version, bad header) and OSError."""
    with NPY_HEADER_LOCK:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unknown npy version {version}")
    return tuple(shape), bool(fortran), dtype


def npy_problem(path: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> str | None:
    """Whether `path` is a whole .npy file of this shape and dtype (its header and size)."""
    name = path.name
    try:
        with open(path, "rb") as fh:
            found, fortran, found_dtype = read_npy_header(fh)
            start = fh.tell()
            actual = path.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{name} is corrupt ({type(exc).__name__})"
    if found != shape or found_dtype != dtype or fortran:
        return f"{name} does not match meta.json (shape {found}, expected {shape})"
    expected = start + int(np.prod(shape)) * dtype.itemsize
    if actual < expected:
        return f"{name} is truncated ({actual} of {expected} bytes)"
    return None


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """The C-ordered array in `path` (no pickles), read whole or as a read-only memory map;
    only the header is parsed under NPY_HEADER_LOCK. Raises ValueError for a bad header or
    short data, and OSError."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = read_npy_header(fh)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path.name} holds Fortran-ordered or object data")
        start = fh.tell()
        count = math.prod(shape)
        if mmap:
            return np.memmap(fh, dtype=dtype, mode="r", offset=start, shape=shape)
        data = np.fromfile(fh, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"{path.name} is short ({data.size} of {count} values)")
    return data.reshape(shape)


def npz_problem(path: Path, members: tuple[str, ...]) -> str | None:
    """Whether `path` is a whole zip holding `members` (its directory, not its data)."""
    name = path.name
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
    except FileNotFoundError:
        return f"{name} is missing"
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"{name} is corrupt ({type(exc).__name__})"
    for member in members:
        info = infos.get(member)
        if info is None:
            return f"{name} lacks {member}"
        if info.header_offset + info.compress_size > size:
            return f"{name} is truncated"
    return None


def files_problem(folder: Path, meta: dict[str, Any]) -> str | None:
    """What is wrong with a ready avatar's data files (meta already checked), or None."""
    height, width = meta["size"]
    shape = (int(meta["n_frames"]), int(height), int(width), 3)
    problem = npy_problem(folder / "frames.npy", shape, np.dtype(np.uint8))
    for file, members in DATA_FILES.items():
        problem = problem or npz_problem(folder / file, members)
    return problem


def unpack_masks(data: np.ndarray, shapes: np.ndarray) -> list[np.ndarray] | None:
    """The masks packed in masks.npz, or None where the packing is malformed."""
    if data.dtype != np.uint8 or data.ndim != 1 or shapes.ndim != 2 or shapes.shape[1] != 2:
        return None
    sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1].astype(np.int64)
    if (shapes < 0).any() or int(sizes.sum()) != data.size:
        return None
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return [
        data[offsets[i] : offsets[i + 1]].reshape(int(h), int(w)) for i, (h, w) in enumerate(shapes)
    ]


def check_avatar(avatar: Avatar) -> None:
    """Refuse (ValueError) an in-memory avatar whose arrays disagree with each other."""
    n = avatar.n_frames
    if avatar.frames.ndim != 4 or avatar.frames.shape[3] != 3 or avatar.frames.dtype != np.uint8:
        raise ValueError("avatar.frames must be (N, H, W, 3) uint8")
    for label, boxes in (("face_boxes", avatar.face_boxes), ("crop_boxes", avatar.crop_boxes)):
        if boxes.shape != (n, 4):
            raise ValueError(f"avatar.{label} must be ({n}, 4), got {boxes.shape}")
    if len(avatar.masks) != n:
        raise ValueError(f"avatar.masks must hold {n} masks, got {len(avatar.masks)}")
    if avatar.latents is not None and avatar.latents.shape != (n, 8, 32, 32):
        raise ValueError(f"avatar.latents must be ({n}, 8, 32, 32), got {avatar.latents.shape}")


def is_temporary(name: str) -> bool:
    """A write in progress: `.tmp-<hex>/` folders, `.<file>.<hex>.tmp` files."""
    return name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))


def damaged_meta(
    avatar_id: str, folder: Path, meta: dict[str, Any], problem: str
) -> dict[str, Any]:
    """A damaged avatar's meta as readers see it: "failed", the reason as its error."""
    name = meta.get("name")
    created = meta.get("created")
    if not isinstance(created, str):
        with contextlib.suppress(OSError):
            created = datetime.fromtimestamp(folder.stat().st_mtime, UTC).isoformat(
                timespec="milliseconds"
            )
    return {
        **meta,
        "id": avatar_id,
        "name": name if isinstance(name, str) else None,
        "status": "failed",
        "progress": 0.0,
        "error": f"the stored avatar is unusable: {problem}",
        "created": created if isinstance(created, str) else None,
        "n_frames": meta.get("n_frames") if isinstance(meta.get("n_frames"), int) else 0,
        "size": None,
        "fps": None,
    }
