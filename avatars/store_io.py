"""The store's writes: data files (fsynced), meta.json replaced whole, or rewritten in place on
a full disk.

`write_json` writes a temporary file beside the target, fsyncs it and renames it over the
target, so a reader sees the old or the new file, never half of one; a failed write removes
its temporary file. On a full disk (ENOSPC, EDQUOT) there is no room for that temporary file;
`write_json(..., in_place_when_full=True)` then overwrites the target's existing blocks (a
meta.json is one block, so nothing new is allocated) and cuts it to length: a crash in the
middle of that could leave a garbled meta.json, which readers report as a damaged avatar, where
the alternative is a status that can never be written (an avatar "preparing" forever).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from avatars.avatar import Avatar

NO_SPACE = "no space left on the device"
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a full disk or an exhausted quota."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")


def write_json(path: Path, data: dict[str, Any], in_place_when_full: bool = False) -> None:
    """Replace `path` with `data` as JSON, atomically (see the module docstring)."""
    payload = _encode(data)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not (in_place_when_full and is_no_space(exc) and path.exists()):
            raise
        _overwrite(path, payload)


def _overwrite(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(payload))
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writes:
    """A file numpy does not take for a real one, so `np.save` writes through `write` in
    chunks: a full disk then raises OSError(ENOSPC), where a real file's `tofile` raises an
    OSError with no errno ("N requested and M written")."""

    def __init__(self, fh: BinaryIO) -> None:
        self.write = fh.write


def write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(_Writes(fh), array, allow_pickle=False)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
        fh.flush()
        os.fsync(fh.fileno())


def write_avatar_data(folder: Path, avatar: Avatar) -> list[str]:
    """The avatar's data files in `folder` (each fsynced); their names."""
    write_npy(folder / "frames.npy", np.ascontiguousarray(avatar.frames))
    write_npz(
        folder / "boxes.npz",
        {
            "face_boxes": np.asarray(avatar.face_boxes, dtype=np.int32),
            "crop_boxes": np.asarray(avatar.crop_boxes, dtype=np.int32),
        },
    )
    masks = [np.asarray(m, dtype=np.uint8) for m in avatar.masks]
    shapes = np.array([m.shape if m.ndim == 2 else (0, 0) for m in masks], dtype=np.int32)
    data = np.concatenate([m.reshape(-1) for m in masks]) if masks else np.zeros(0, np.uint8)
    write_npz(folder / "masks.npz", {"data": data, "shapes": shapes})
    names = ["frames.npy", "boxes.npz", "masks.npz"]
    if avatar.latents is not None:
        write_npy(folder / "latents.npy", np.asarray(avatar.latents, dtype=np.float32))
        names.append("latents.npy")
    return names
