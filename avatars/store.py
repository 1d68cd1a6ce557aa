"""Prepared avatars on disk: a versioned folder per avatar.

Layout (format_version 1 = `avatars.avatar.FORMAT_VERSION`)::

    <avatars_dir>/
      av_<16 hex>/              one avatar; the id is made by the server, never by a client
        meta.json               the commit point, always replaced whole (tmp + os.replace)
        frames.npy              (N, H, W, 3) uint8 RGB; loaded with mmap (no copy, no parse)
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from avatars.avatar import FORMAT_VERSION, Avatar

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"av_[0-9a-f]{16}")
STATUSES = ("pending", "preparing", "ready", "failed")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
        fh.flush()
        os.fsync(fh.fileno())


def _check_avatar(avatar: Avatar) -> None:
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
        """The avatar's meta.json as a dict (raises AvatarNotFoundError)."""
        path = self._meta_path(avatar_id)
        try:
            with open(path, encoding="utf-8") as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            raise AvatarNotFoundError(f"no avatar {avatar_id!r}") from None
        except (OSError, ValueError) as exc:
            raise AvatarStoreError(f"avatar {avatar_id!r} has an unreadable meta.json") from exc
        if not isinstance(meta, dict):
            raise AvatarStoreError(f"avatar {avatar_id!r} has an unreadable meta.json")
        return meta

    def _update(self, avatar_id: str, **changes: Any) -> dict[str, Any]:
        with _META_LOCK:
            meta = self.info(avatar_id)
            meta.update(changes, updated=_now())
            try:
                _write_json(self._meta_path(avatar_id), meta)
            except FileNotFoundError:  # deleted by another process meanwhile
                raise AvatarNotFoundError(f"no avatar {avatar_id!r}") from None
            return meta

    # ---- lifecycle ---------------------------------------------------------------------

    def create(self, name: str, avatar_id: str | None = None) -> str:
        """Register a new, empty avatar (status "pending"); returns its id."""
        name = validate_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        avatar_id = validate_id(avatar_id) if avatar_id else self.new_id()
        folder = self.root / avatar_id
        try:
            folder.mkdir()
        except FileExistsError:
            raise AvatarStoreError(f"avatar {avatar_id!r} already exists") from None
        now = _now()
        _write_json(
            folder / "meta.json",
            {
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
            },
        )
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
        _check_avatar(avatar)
        validate_id(avatar.id)
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / avatar.id
        with _META_LOCK:
            existing = self.info(avatar.id) if folder.exists() else None
            if existing is not None and existing.get("status") == "ready":
                self._update(avatar.id, status="preparing")
        created = existing.get("created", _now()) if existing else _now()
        tmp = (folder if existing is not None else self.root) / f".tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            names = self._write_data(tmp, avatar)
            meta = self._meta_for(avatar, created)
            if existing is None:
                _write_json(tmp / "meta.json", meta)
                _fsync_dir(tmp)
                os.rename(tmp, folder)  # fails if the id appeared meanwhile: no overwrite
            else:
                for file in names:
                    os.replace(tmp / file, folder / file)
                if avatar.latents is None:
                    with contextlib.suppress(FileNotFoundError):
                        (folder / "latents.npy").unlink()
                with _META_LOCK:
                    _write_json(folder / "meta.json", meta)
                tmp.rmdir()
            _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved avatar", extra={"avatar_id": avatar.id, "frames": avatar.n_frames})

    def _write_data(self, folder: Path, avatar: Avatar) -> list[str]:
        _write_npy(folder / "frames.npy", np.ascontiguousarray(avatar.frames))
        _write_npz(
            folder / "boxes.npz",
            {
                "face_boxes": np.asarray(avatar.face_boxes, dtype=np.int32),
                "crop_boxes": np.asarray(avatar.crop_boxes, dtype=np.int32),
            },
        )
        masks = [np.asarray(m, dtype=np.uint8) for m in avatar.masks]
        shapes = np.array([m.shape if m.ndim == 2 else (0, 0) for m in masks], dtype=np.int32)
        data = np.concatenate([m.reshape(-1) for m in masks]) if masks else np.zeros(0, np.uint8)
        _write_npz(folder / "masks.npz", {"data": data, "shapes": shapes})
        names = ["frames.npy", "boxes.npz", "masks.npz"]
        if avatar.latents is not None:
            _write_npy(folder / "latents.npy", np.asarray(avatar.latents, dtype=np.float32))
            names.append("latents.npy")
        return names

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
            _write_npy(tmp, latents)
            self._update(avatar_id, latents_key=None)  # invalidate before the swap
            os.replace(tmp, folder / "latents.npy")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._update(avatar_id, latents_key=str(key))

    def load(self, avatar_id: str, mmap: bool = True) -> Avatar:
        """The ready avatar. `frames` is a read-only memory map unless `mmap` is False."""
        meta = self.info(avatar_id)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise AvatarStoreError(
                f"avatar {avatar_id!r} is stored in format version {version!r}, and this "
                f"lipstream reads version {FORMAT_VERSION}: add the avatar again"
            )
        status = meta.get("status")
        if status != "ready":
            detail = f": {meta.get('error')}" if status == "failed" and meta.get("error") else ""
            raise AvatarNotReadyError(f"avatar {avatar_id!r} is {status}{detail}")
        folder = self.path(avatar_id)
        n = int(meta["n_frames"])
        try:
            frames = np.load(folder / "frames.npy", mmap_mode="r" if mmap else None)
            with np.load(folder / "boxes.npz", allow_pickle=False) as boxes:
                face_boxes, crop_boxes = boxes["face_boxes"], boxes["crop_boxes"]
            with np.load(folder / "masks.npz", allow_pickle=False) as packed:
                data, shapes = packed["data"], packed["shapes"]
            latents = None
            if meta.get("latents_key") and (folder / "latents.npy").exists():
                latents = np.load(folder / "latents.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError) as exc:
            raise AvatarStoreError(f"avatar {avatar_id!r} has missing or corrupt files") from exc
        masks = _unpack_masks(data, shapes)
        height, width = meta["size"]
        if (
            frames.shape != (n, height, width, 3)
            or face_boxes.shape != (n, 4)
            or crop_boxes.shape != (n, 4)
            or len(masks) != n
            or (latents is not None and latents.shape != (n, 8, 32, 32))
        ):
            raise AvatarStoreError(f"avatar {avatar_id!r} has files that disagree with meta.json")
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

    def list(self) -> list[dict[str, Any]]:
        """Every avatar's meta, oldest first (unreadable ones are logged and skipped)."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if not ID_PATTERN.fullmatch(entry.name) or not entry.is_dir():
                continue
            try:
                found.append(self.info(entry.name))
            except AvatarStoreError:
                log.warning("skipping unreadable avatar", extra={"avatar_id": entry.name})
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
        """At start-up (one process): remove leftover temporary folders and mark avatars left
        "pending"/"preparing" by a crash as failed. Returns the ids marked failed."""
        failed: builtins.list[str] = []
        if not self.root.is_dir():
            return failed
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif ID_PATTERN.fullmatch(entry.name) and entry.is_dir():
                for leftover in entry.glob(".tmp-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                try:
                    status = self.info(entry.name).get("status")
                except AvatarStoreError:
                    continue
                if status in ("pending", "preparing"):
                    self.set_status(entry.name, "failed", error="interrupted by a restart")
                    failed.append(entry.name)
        return failed


def _unpack_masks(data: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    if data.dtype != np.uint8 or shapes.ndim != 2 or shapes.shape[1] != 2:
        raise AvatarStoreError("masks.npz is malformed")
    sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1].astype(np.int64)
    if (shapes < 0).any() or int(sizes.sum()) != data.size:
        raise AvatarStoreError("masks.npz is malformed")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return [
        data[offsets[i] : offsets[i + 1]].reshape(int(h), int(w)) for i, (h, w) in enumerate(shapes)
    ]
