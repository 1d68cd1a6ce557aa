"""Prepared avatars on disk: a versioned folder per avatar.

Layout (format_version 1 = `avatars.avatar.FORMAT_VERSION`)::

    <avatars_dir>/
      av_<16 hex>/              one avatar; the id is made by the server, never by a client
        meta.json               the commit point, always replaced whole (tmp + os.replace)
        frames.npy              (N, H, W, 3) uint8 RGB; loaded whole, or with mmap on request
        boxes.npz               face_boxes (N, 4) int32, crop_boxes (N, 4) int32 (-1: no face)
        masks.npz               data: every mask's bytes, concatenated (uint8, flat);
                                shapes: (N, 2) int32 (crop_h, crop_w), (0, 0) where no face
        latents.npy             optional (N, 8, 32, 32) float32; (re)written by an engine
      .tmp-<hex>/               a write in progress (removed when done, or by `recover`)

meta.json::

    {"format_version": 1, "id": "av_...", "name": "...", "status": "pending|preparing|ready|failed",
     "progress": 0.0..1.0, "error": null | "message", "created": "ISO 8601 UTC",
     "updated": "...", "n_frames": N, "size": [H, W], "fps": 25.0, "bbox_shift": 0,
     "latents_key": null | "key of the VAE weights", "prep_seconds_per_frame": 0.05,
     "prep": {details of the preparation: detector, stage timings, ...}}

Writes are atomic. A new avatar's files are written into `.tmp-<hex>/` and that folder is
renamed to `av_<id>/`. For an avatar folder that already exists (made by `create`), its data
files are written into `av_<id>/.tmp-<hex>/`, moved into place with `os.replace`, and the
new meta.json (status "ready") is written last; meanwhile the status is not "ready", and
`load` refuses anything not "ready", so a reader never sees a half-written avatar. Numpy
files load with `allow_pickle=False`. Ids are checked against `ID_PATTERN` before any path
is built, so no id can reach outside the store's root.

Damage: files may change under a reader (another process, a full disk, an operator).
`describe` (and `list`) report an avatar whose meta.json is unreadable or ill-typed, or whose
data files are missing, truncated or disagree with meta.json, as "failed" with the reason
(`avatars.store_check`; not written back, so a repaired file is seen at once); `load` refuses
it with `AvatarDamagedError`. `delete` removes any avatar folder, damaged or not. A full disk
is `AvatarStoreFullError`, with nothing half-written left behind.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from avatars import store_io
from avatars.avatar import FORMAT_VERSION, Avatar, face_pipeline_fields
from avatars.store_check import (
    NPY_HEADER_LOCK,
    STATUSES,
    check_avatar,
    damaged_meta,
    files_problem,
    is_temporary,
    meta_problem,
    read_npy,
    unpack_masks,
)
from avatars.store_io import NO_SPACE, fsync_dir, is_no_space, write_json

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"av_[0-9a-f]{16}")
MAX_NAME_LENGTH = 64
_META_LOCK = threading.RLock()  # serialises meta read-modify-write within the process


class AvatarStoreError(RuntimeError):
    """The store cannot do what was asked; the message says why."""


class AvatarNotFoundError(AvatarStoreError, KeyError):
    """No avatar with that id (or a malformed id)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AvatarNotReadyError(AvatarStoreError):
    """The avatar exists but is still being prepared, or its preparation failed."""


class AvatarDamagedError(AvatarStoreError):
    """The avatar's files are unreadable, missing or truncated; the message says which."""


class AvatarStoreFullError(AvatarStoreError):
    """No space left on the device (or quota) for a write; nothing half-written was kept."""


def validate_id(avatar_id: str) -> str:
    if not isinstance(avatar_id, str) or not ID_PATTERN.fullmatch(avatar_id):
        raise AvatarNotFoundError(f"no avatar {avatar_id!r} (not a valid avatar id)")
    return avatar_id


def validate_name(name: str) -> str:
    """A display name: 1..64 printable characters, surrounding spaces removed."""
    if not isinstance(name, str):
        raise ValueError("an avatar name must be a string")
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_LENGTH or not name.isprintable():
        raise ValueError(f"an avatar name must be 1 to {MAX_NAME_LENGTH} printable characters")
    return name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AvatarStore:
    """Avatars under one root folder. Safe to share between threads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---- paths and meta ----------------------------------------------------------------

    def path(self, avatar_id: str) -> Path:
        return self.root / validate_id(avatar_id)

    def new_id(self) -> str:
        while True:
            avatar_id = "av_" + secrets.token_hex(8)
            if not (self.root / avatar_id).exists():
                return avatar_id

    def _meta_path(self, avatar_id: str) -> Path:
        return self.path(avatar_id) / "meta.json"

    def info(self, avatar_id: str) -> dict[str, Any]:
        """The avatar's meta.json as a dict, as stored (raises AvatarNotFoundError, and
        AvatarDamagedError where it is unreadable)."""
        path = self._meta_path(avatar_id)
        try:
            with open(path, encoding="utf-8") as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            raise AvatarNotFoundError(f"no avatar {avatar_id!r}") from None
        except (OSError, ValueError) as exc:
            raise AvatarDamagedError(f"avatar {avatar_id!r} has an unreadable meta.json") from exc
        if not isinstance(meta, dict):
            raise AvatarDamagedError(f"avatar {avatar_id!r} has an unreadable meta.json")
        return meta

    def describe(self, avatar_id: str) -> dict[str, Any]:
        """The avatar's meta, with status "failed" and the reason where its files are damaged
        (see the module docstring). Raises AvatarNotFoundError only where no folder exists."""
        folder = self.path(avatar_id)
        try:
            meta = self.info(avatar_id)
        except AvatarNotFoundError:
            if not folder.is_dir():
                raise
            return damaged_meta(avatar_id, folder, {}, "meta.json is missing")
        except AvatarDamagedError:
            return damaged_meta(avatar_id, folder, {}, "meta.json is unreadable")
        problem = meta_problem(meta, FORMAT_VERSION)
        if problem is None and meta.get("status") == "ready":
            problem = files_problem(folder, meta)
        if problem is not None:
            return damaged_meta(avatar_id, folder, meta, problem)
        return {**meta, **face_pipeline_fields(meta), "id": avatar_id}

    def _update(self, avatar_id: str, **changes: Any) -> dict[str, Any]:
        with _META_LOCK:
            meta = self.info(avatar_id)
            meta.update(changes, updated=_now())
            try:
                write_json(self._meta_path(avatar_id), meta, in_place_when_full=True)
            except FileNotFoundError:  # deleted by another process meanwhile
                raise AvatarNotFoundError(f"no avatar {avatar_id!r}") from None
            except OSError as exc:
                if is_no_space(exc):
                    raise AvatarStoreFullError(f"{NO_SPACE} to update the avatar") from exc
                raise
            return meta

    # ---- lifecycle ---------------------------------------------------------------------

    def create(self, name: str, avatar_id: str | None = None) -> str:
        """Register a new, empty avatar (status "pending"); returns its id. Its folder
        appears whole (written aside, then renamed) or not at all."""
        name = validate_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        avatar_id = validate_id(avatar_id) if avatar_id else self.new_id()
        folder = self.root / avatar_id
        if folder.exists():
            raise AvatarStoreError(f"avatar {avatar_id!r} already exists")
        now = _now()
        meta = {
            "format_version": FORMAT_VERSION,
            "id": avatar_id,
            "name": name,
            "status": "pending",
            "progress": 0.0,
            "error": None,
            "created": now,
            "updated": now,
            "n_frames": 0,
            "size": None,
            "fps": None,
            "bbox_shift": 0,
            "latents_key": None,
            "prep_seconds_per_frame": None,
            "prep": {},
        }
        tmp = self.root / f".tmp-{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
            write_json(tmp / "meta.json", meta)
            os.rename(tmp, folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_no_space(exc):
                raise AvatarStoreFullError(f"{NO_SPACE} for a new avatar") from exc
            raise
        return avatar_id

    def set_status(
        self,
        avatar_id: str,
        status: str,
        progress: float | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Update status (pending|preparing|ready|failed), progress (0..1) and error."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        changes: dict[str, Any] = {"status": status, "error": error}
        if progress is not None:
            changes["progress"] = round(min(max(float(progress), 0.0), 1.0), 4)
        return self._update(avatar_id, **changes)

    def save(self, avatar: Avatar) -> None:
        """Write a prepared avatar and mark it "ready" (atomically, see the module doc)."""
        check_avatar(avatar)
        validate_id(avatar.id)
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / avatar.id
        with _META_LOCK:
            existing = self.info(avatar.id) if folder.exists() else None
            if existing is not None and existing.get("status") == "ready":
                self._update(avatar.id, status="preparing")
        created = existing.get("created", _now()) if existing else _now()
        tmp = (folder if existing is not None else self.root) / f".tmp-{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
            names = store_io.write_avatar_data(tmp, avatar)
            meta = self._meta_for(avatar, created)
            if existing is None:
                write_json(tmp / "meta.json", meta)
                fsync_dir(tmp)
                os.rename(tmp, folder)  # fails if the id appeared meanwhile: no overwrite
            else:
                for file in names:
                    os.replace(tmp / file, folder / file)
                if avatar.latents is None:
                    with contextlib.suppress(FileNotFoundError):
                        (folder / "latents.npy").unlink()
                with _META_LOCK:
                    write_json(folder / "meta.json", meta)
                tmp.rmdir()
            fsync_dir(folder)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_no_space(exc):
                raise AvatarStoreFullError(f"{NO_SPACE} to store the avatar") from exc
            raise
        log.info("saved avatar", extra={"avatar_id": avatar.id, "frames": avatar.n_frames})

    def _meta_for(self, avatar: Avatar, created: str) -> dict[str, Any]:
        prep = dict(avatar.meta)
        prep.pop("format_version", None)
        return {
            "format_version": FORMAT_VERSION,
            "id": avatar.id,
            "name": validate_name(avatar.name),
            "status": "ready",
            "progress": 1.0,
            "error": None,
            "created": created,
            "updated": _now(),
            "n_frames": avatar.n_frames,
            "size": list(avatar.size),
            "fps": float(avatar.fps),
            "bbox_shift": int(avatar.bbox_shift),
            "latents_key": avatar.latents_key if avatar.latents is not None else None,
            "prep_seconds_per_frame": prep.get("prep_seconds_per_frame"),
            **face_pipeline_fields({**prep, "status": "ready"}),
            "prep": prep,
        }

    def save_latents(self, avatar_id: str, latents: np.ndarray, key: str) -> None:
        """(Re)write the avatar's latents, made by the VAE weights identified by `key`."""
        meta = self.info(avatar_id)
        n = int(meta.get("n_frames") or 0)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != (n, 8, 32, 32):
            raise ValueError(f"latents must be ({n}, 8, 32, 32), got {latents.shape}")
        if not key:
            raise ValueError("latents need the key of the VAE weights that made them")
        folder = self.path(avatar_id)
        tmp = folder / f".latents.{secrets.token_hex(4)}.tmp"
        try:
            store_io.write_npy(tmp, latents)
            self._update(avatar_id, latents_key=None)  # invalidate before the swap
            os.replace(tmp, folder / "latents.npy")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._update(avatar_id, latents_key=str(key))

    def load(self, avatar_id: str, mmap: bool = True) -> Avatar:
        """The ready avatar. `frames` is a read-only memory map unless `mmap` is False: a
        long-lived reader (the server) loads them whole, since touching a memory map of a
        file truncated meanwhile kills the process (SIGBUS). Raises AvatarNotReadyError, and
        AvatarDamagedError (the reason in its message) for damaged files."""
        meta = self.info(avatar_id)
        problem = meta_problem(meta, FORMAT_VERSION)
        if problem is None and meta.get("status") != "ready":
            status = meta.get("status")
            detail = f": {meta.get('error')}" if status == "failed" and meta.get("error") else ""
            raise AvatarNotReadyError(f"avatar {avatar_id!r} is {status}{detail}")
        folder = self.path(avatar_id)
        problem = problem or files_problem(folder, meta)
        if problem is not None:
            raise AvatarDamagedError(f"avatar {avatar_id!r} is unusable: {problem}")
        n = int(meta["n_frames"])
        try:
            frames = read_npy(folder / "frames.npy", mmap=mmap)
            with NPY_HEADER_LOCK:  # small arrays: the whole read under the lock
                with np.load(folder / "boxes.npz", allow_pickle=False) as boxes:
                    face_boxes, crop_boxes = boxes["face_boxes"], boxes["crop_boxes"]
                with np.load(folder / "masks.npz", allow_pickle=False) as packed:
                    data, shapes = packed["data"], packed["shapes"]
            masks = unpack_masks(data, shapes)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise AvatarDamagedError(
                f"avatar {avatar_id!r} is unusable: its files changed while being read"
            ) from exc
        if (
            masks is None
            or frames.shape != (n, *meta["size"], 3)
            or face_boxes.shape != (n, 4)
            or crop_boxes.shape != (n, 4)
            or len(masks) != n
        ):
            raise AvatarDamagedError(
                f"avatar {avatar_id!r} is unusable: its files disagree with meta.json"
            )
        latents = self._load_latents(avatar_id, folder, meta, n)
        return Avatar(
            id=avatar_id,
            name=meta["name"],
            fps=float(meta["fps"]),
            frames=frames,
            face_boxes=face_boxes.astype(np.int32, copy=False),
            crop_boxes=crop_boxes.astype(np.int32, copy=False),
            masks=masks,
            latents=latents,
            latents_key=meta.get("latents_key") if latents is not None else None,
            bbox_shift=int(meta.get("bbox_shift", 0)),
            meta=dict(meta.get("prep") or {}),
        )

    def _load_latents(
        self, avatar_id: str, folder: Path, meta: dict[str, Any], n: int
    ) -> np.ndarray | None:
        """The stored latents, or None (none stored, or damaged: an engine makes them anew)."""
        path = folder / "latents.npy"
        if not meta.get("latents_key") or not path.exists():
            return None
        try:
            latents = read_npy(path)
        except (OSError, ValueError, EOFError):
            latents = None
        if latents is None or latents.shape != (n, 8, 32, 32) or latents.dtype != np.float32:
            log.warning("ignoring damaged latents", extra={"avatar_id": avatar_id})
            return None
        return np.asarray(latents)

    def list(self) -> list[dict[str, Any]]:
        """Every avatar's meta (`describe`: damaged ones as "failed"), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if not ID_PATTERN.fullmatch(entry.name) or not entry.is_dir():
                continue
            with contextlib.suppress(AvatarNotFoundError):  # deleted meanwhile
                found.append(self.describe(entry.name))
        return sorted(found, key=lambda m: (str(m.get("created", "")), str(m.get("id"))))

    def resolve(self, id_or_name: str) -> str:
        """The id of the avatar with this id, or else with this unique name."""
        if ID_PATTERN.fullmatch(id_or_name) and (self.root / id_or_name).is_dir():
            return id_or_name
        matches = [m["id"] for m in self.list() if m.get("name") == id_or_name]
        if not matches:
            raise AvatarNotFoundError(f"no avatar with id or name {id_or_name!r}")
        if len(matches) > 1:
            raise AvatarStoreError(
                f"{len(matches)} avatars are named {id_or_name!r}; use an id: {matches}"
            )
        return matches[0]

    def delete(self, avatar_id: str) -> None:
        """Remove the avatar's folder (it disappears at once: renamed, then removed)."""
        folder = self.path(avatar_id)
        trash = self.root / f".tmp-{secrets.token_hex(6)}"
        try:
            with _META_LOCK:  # not in the middle of a status update
                os.rename(folder, trash)
        except FileNotFoundError:
            raise AvatarNotFoundError(f"no avatar {avatar_id!r}") from None
        shutil.rmtree(trash, ignore_errors=True)

    def recover(self) -> builtins.list[str]:
        """At start-up (one process): remove leftover temporary files and folders, and avatar
        folders a crash left with nothing but those; mark avatars left "pending"/"preparing"
        by a crash as failed. Returns the ids marked failed."""
        failed: builtins.list[str] = []
        if not self.root.is_dir():
            return failed
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif ID_PATTERN.fullmatch(entry.name) and entry.is_dir():
                for leftover in entry.iterdir():
                    if is_temporary(leftover.name):
                        shutil.rmtree(leftover, ignore_errors=True)
                        with contextlib.suppress(FileNotFoundError):
                            leftover.unlink()
                if not any(entry.iterdir()):  # created, never written: half of nothing
                    with contextlib.suppress(OSError):
                        entry.rmdir()
                    continue
                if self._fail_interrupted(entry.name):
                    failed.append(entry.name)
        return failed

    def _fail_interrupted(self, avatar_id: str) -> bool:
        try:
            if self.info(avatar_id).get("status") not in ("pending", "preparing"):
                return False
            self.set_status(avatar_id, "failed", error="interrupted by a restart")
        except AvatarStoreError:  # damaged (listed as failed anyway) or a full disk
            log.warning(
                "could not mark an interrupted avatar failed", extra={"avatar_id": avatar_id}
            )
            return False
        return True
