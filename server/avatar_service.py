"""Avatars for the server: background preparation, live progress, engine loading, deletion.

Preparation (decode -> faces -> masks -> latents) runs in ONE background thread, one upload at
a time; its progress (0..1) and stage are kept in memory for GET and written to the store's
meta.json at most twice a second. Failures become status "failed" with a readable error.
Engine work (latent encoding, load_avatar, unload_avatar) goes through a unit's frame worker,
the only thread that touches its engine (`server.session.devices`): latents are made on the
primary unit; an avatar is made resident on the unit a session runs on when one first needs it
there (`ready`) and unloaded from a unit once no session there uses it: at once with several
devices, beyond the `idle_avatars` most recently used with one (`trim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from avatars.avatar import FALLBACK_WARNING, Avatar
from avatars.decode import AvatarInputError, DecodeLimits
from avatars.musetalk_faces.pipeline import GET_WEIGHTS as GET_FACE_MODELS
from avatars.musetalk_faces.pipeline import FacePipeline
from avatars.prepare import prepare_avatar_file
from avatars.store import AvatarNotFoundError, AvatarStore, AvatarStoreError
from avatars.store_io import NO_SPACE, is_no_space
from server.media.pictures import IdleFrames
from server.metrics import ServerMetrics
from server.session.devices import Devices, Unit

log = logging.getLogger(__name__)

PROGRESS_WRITE_S = 0.5
UPLOADS = ".uploads"
INTERNAL_ERROR = "preparation failed (internal error; see the server log)"
NO_SPACE_ERROR = f"preparation failed: {NO_SPACE} (free space in the avatars folder, then retry)"
PUBLIC_FIELDS = (
    "id",
    "name",
    "status",
    "progress",
    "error",
    "created",
    "updated",
    "n_frames",
    "size",
    "fps",
    "bbox_shift",
    "face_pipeline",
    "face_pipeline_reason",
    "bbox_shift_range",
)


class AvatarNotReady(Exception):
    """The avatar exists but cannot be used yet (or its preparation failed)."""


class AvatarService:
    def __init__(
        self,
        store: AvatarStore,
        devices: Devices,
        metrics: ServerMetrics,
        limits: DecodeLimits,
        idle_frames: IdleFrames,
        models_dir: Path | None = None,
        device: str = "auto",
    ) -> None:
        self.store = store
        self.devices = devices
        self.metrics = metrics
        self.limits = limits  # what an upload is probed and decoded against
        self.idle_frames = idle_frames  # the sessions' cached idle pictures
        self.uploads_dir = store.root / UPLOADS
        self.models_dir = models_dir  # the face models' weights (None: the fallback only)
        self.device = device
        self._faces: FacePipeline | None = None  # loaded once, by the preparation thread
        self._live_faces: dict[str, tuple[str, str | None]] = {}  # id -> (pipeline, reason)
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-prep")
        self._jobs: dict[str, tuple[Future[None], Path]] = {}
        self._live: dict[str, tuple[float, str]] = {}  # id -> (progress, stage) while preparing
        self._loaded: dict[str, Avatar] = {}  # host copies of the avatars resident anywhere
        self._resident: dict[Unit, set[str]] = {}
        self._used: dict[tuple[Unit, str], float] = {}  # when a session last asked for it there
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._deleted: set[str] = set()
        self._failed: dict[str, str] = {}  # id -> error, where "failed" could not be written
        self._lock = threading.Lock()  # save vs delete

    # -- lifecycle -----------------------------------------------------------------------
    def startup(self) -> list[str]:
        """Recover the store (interrupted preparations -> failed), drop stale uploads."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        failed = self.store.recover()
        if self.uploads_dir.is_dir():
            for leftover in self.uploads_dir.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
        ready = [m["id"] for m in self.store.list() if m.get("status") == "ready"]
        log.info("avatars found", extra={"ready": len(ready), "marked_failed": len(failed)})
        self._count()
        return failed

    def shutdown(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- queries -------------------------------------------------------------------------
    def pending(self) -> int:
        """Uploads queued or being prepared now."""
        return len(self._live)

    def public(self, meta: dict[str, Any]) -> dict[str, Any]:
        out = {k: meta.get(k) for k in PUBLIC_FIELDS}
        avatar_id = str(meta.get("id"))
        live = self._live.get(avatar_id)
        if out["status"] in ("pending", "preparing"):
            if avatar_id in self._failed:  # its final status could not be written (full disk)
                out.update(status="failed", error=self._failed[avatar_id])
            elif live is not None:
                out["progress"] = round(max(float(out["progress"] or 0.0), live[0]), 4)
                out["stage"] = live[1]
            faces = self._live_faces.get(avatar_id)
            if faces is not None:
                out["face_pipeline"], out["face_pipeline_reason"] = faces
        prep = meta.get("prep")
        if isinstance(prep, dict) and isinstance(prep.get("stage_seconds"), dict):
            out["stage_seconds"] = prep["stage_seconds"]  # per preparation stage
        if out["face_pipeline"] == "fallback":
            out["warning"] = f"{FALLBACK_WARNING}. {GET_FACE_MODELS}"
        return out

    def list(self) -> list[dict[str, Any]]:
        return [self.public(m) for m in self.store.list()]

    def get(self, avatar_id: str) -> dict[str, Any]:
        """The avatar as clients see it (damaged files: "failed", the reason as its error).
        Raises AvatarNotFoundError."""
        return self.public(self.store.describe(avatar_id))

    # -- registration --------------------------------------------------------------------
    def submit(self, upload: Path, name: str, bbox_shift: int) -> dict[str, Any]:
        """Register an avatar for the uploaded file and queue its preparation. Raises
        AvatarStoreFullError (nothing registered) on a full disk."""
        avatar_id = self.store.create(name)
        self._live[avatar_id] = (0.0, "queued")
        future = self._prep.submit(self._prepare, avatar_id, upload, name, bbox_shift)
        if not future.done():
            self._jobs[avatar_id] = (future, upload)
        self._count()
        return self.get(avatar_id)

    def _prepare(self, avatar_id: str, upload: Path, name: str, bbox_shift: int) -> None:
        """Preparation thread: the upload becomes a stored avatar (or a failed one). The
        upload is removed before the final status is written: a client that sees "ready" or
        "failed" finds nothing of its upload left."""
        try:
            try:
                outcome = self._prepared(avatar_id, upload, name, bbox_shift)
            finally:
                with contextlib.suppress(OSError):
                    upload.unlink()
            self._store_outcome(avatar_id, outcome)
        finally:
            self._live.pop(avatar_id, None)
            self._live_faces.pop(avatar_id, None)
            self._jobs.pop(avatar_id, None)
            self._count()

    def _prepared(
        self, avatar_id: str, upload: Path, name: str, bbox_shift: int
    ) -> Avatar | str | None:
        """The avatar made from the upload, or the error its status shows (None: deleted
        before it started)."""
        if avatar_id in self._deleted:
            return None
        try:
            self.store.set_status(avatar_id, "preparing", progress=0.0)
            faces, reason = self._face_pipeline(avatar_id)
            avatar = prepare_avatar_file(
                upload,
                name=name,
                avatar_id=avatar_id,
                bbox_shift=bbox_shift,
                limits=self.limits,
                encode_latents=self._encoder(),
                progress=self._progress_cb(avatar_id),
                face_pipeline=faces,
                fallback_reason=reason or None,
            )
        except AvatarInputError as exc:  # the upload's fault: the client is told why
            log.warning(
                "avatar preparation failed", extra={"avatar_id": avatar_id, "reason": str(exc)}
            )
            return str(exc)
        except Exception as exc:
            return _failure(avatar_id, exc)
        key = getattr(self.devices.primary.engine, "latents_key", None)
        if avatar.latents is not None and key:
            avatar.latents_key = str(key)  # made by this engine's VAE: reuse on load
        return avatar

    def _face_pipeline(self, avatar_id: str) -> tuple[FacePipeline | None, str]:
        """MuseTalk's face pipeline (loaded once), or None and why: then the fallback is used
        and said so, in the server log and the avatar's status, once per preparation."""
        reason = ""
        if self._faces is None:
            if self.models_dir is None:
                reason = "no models folder is configured for the face models"
            else:
                device = None if self.device == "auto" else self.device
                self._faces, reason = FacePipeline.load(self.models_dir, device)
        if self._faces is not None:
            self._live_faces[avatar_id] = ("musetalk", None)
            return self._faces, ""
        self._live_faces[avatar_id] = ("fallback", reason)
        log.warning(
            "avatar prepared with the fallback face pipeline: less accurate lips",
            extra={"avatar_id": avatar_id, "reason": reason},
        )
        return None, reason

    def _store_outcome(self, avatar_id: str, outcome: Avatar | str | None) -> None:
        """The final status: the avatar saved ("ready"), or "failed" with its error."""
        if outcome is None:
            return
        if isinstance(outcome, str):
            self._fail(avatar_id, outcome)
            return
        try:
            with self._lock:
                if avatar_id in self._deleted:
                    return
                self.store.save(outcome)
        except Exception as exc:
            self._fail(avatar_id, _failure(avatar_id, exc))
            return
        log.info("avatar ready", extra={"avatar_id": avatar_id, "frames": outcome.n_frames})

    def _fail(self, avatar_id: str, message: str) -> None:
        if avatar_id in self._deleted:
            return
        try:
            self.store.set_status(avatar_id, "failed", error=message)
        except AvatarNotFoundError:
            pass
        except (AvatarStoreError, OSError):
            # shown from memory until a restart (which marks it failed, as interrupted)
            self._failed[avatar_id] = message
            log.warning(
                "could not store an avatar's failed status",
                exc_info=True,
                extra={"avatar_id": avatar_id},
            )

    def _progress_cb(self, avatar_id: str) -> Callable[[float, str], None]:
        last = [0.0]

        def progress(fraction: float, stage: str) -> None:
            self._live[avatar_id] = (float(fraction), stage)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_WRITE_S and avatar_id not in self._deleted:
                last[0] = now
                # progress is shown from memory too: a write that fails (a full disk) is skipped
                with contextlib.suppress(AvatarStoreError, OSError):
                    self.store.set_status(avatar_id, "preparing", progress=fraction)

        return progress

    def _encoder(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The engine's latent encoder, run on the worker thread (None if it has none)."""
        unit = self.devices.primary
        encode = getattr(unit.engine, "encode_latents", None)
        if encode is None:
            return None

        def run(crops: np.ndarray) -> np.ndarray:
            return np.asarray(unit.worker.call(encode, crops).result())

        return run

    # -- engine residency ----------------------------------------------------------------
    async def ready(self, avatar_id: str, unit: Unit | None = None) -> Avatar:
        """The avatar, resident on `unit` (default: the primary). Raises AvatarNotFoundError
        (unknown, or being deleted) / AvatarNotReady (not ready, failed, or its files damaged:
        the reason)."""
        unit = unit or self.devices.primary
        self._check_not_deleted(avatar_id)
        meta = self.public(await asyncio.to_thread(self.store.describe, avatar_id))
        self._check_not_deleted(avatar_id)  # its files may have gone while described
        status = meta.get("status")
        if status != "ready":
            detail = f": {meta.get('error')}" if status == "failed" and meta.get("error") else ""
            raise AvatarNotReady(f"avatar {avatar_id!r} is {status}{detail}")
        loaded = self._loaded.get(avatar_id)
        self._used[(unit, avatar_id)] = time.monotonic()
        if loaded is not None and avatar_id in self._resident.get(unit, ()):
            return loaded
        lock = self._load_locks.setdefault(avatar_id, asyncio.Lock())
        async with lock:  # `delete` and `release` take it too: loads and unloads in turn
            self._check_not_deleted(avatar_id)
            loaded = self._loaded.get(avatar_id)
            if loaded is None:
                loaded = await self._load(avatar_id)
            if avatar_id not in self._resident.get(unit, ()):
                await self._make_resident(loaded, unit)
        return loaded

    def _check_not_deleted(self, avatar_id: str) -> None:
        if avatar_id in self._deleted:
            raise AvatarNotFoundError(f"no avatar {avatar_id!r} (deleted)")

    async def _load(self, avatar_id: str) -> Avatar:
        """Load from the store, whole (not a memory map of files that may change); called
        with the avatar's load lock held."""
        try:
            avatar = await asyncio.to_thread(self.store.load, avatar_id, False)
        except AvatarNotFoundError:
            raise
        except AvatarStoreError as exc:
            self._check_not_deleted(avatar_id)  # its folder went away under the load
            raise AvatarNotReady(str(exc)) from None
        self._loaded[avatar_id] = avatar
        return avatar

    async def _make_resident(self, avatar: Avatar, unit: Unit) -> None:
        """Load `avatar` into `unit`'s engine; called with the avatar's load lock held."""
        stored_key = avatar.latents_key
        # through the worker: the GPU scheduler also uploads its paste-back data
        # and runs one warm frame, so the session's first frame pays no set-up
        await asyncio.wrap_future(unit.worker.load_avatar(avatar))
        if avatar.id in self._deleted:  # deleted while it loaded: leave nothing resident
            await asyncio.wrap_future(unit.worker.unload_avatar(avatar.id))
            self._check_not_deleted(avatar.id)
        self._resident.setdefault(unit, set()).add(avatar.id)
        log.info(
            "avatar loaded into the engine", extra={"avatar_id": avatar.id, "device": unit.device}
        )
        if avatar.latents is not None and avatar.latents_key and avatar.latents_key != stored_key:
            # the engine made latents for this avatar: keep them for the next start
            await asyncio.to_thread(self._save_latents, avatar)

    async def release(self, avatar_id: str, unit: Unit, in_use: Callable[[], bool]) -> bool:
        """Unload the avatar from `unit` unless `in_use()` (read under the avatar's lock: a
        session placed meanwhile keeps it); the host copy goes once no unit holds it. Whether
        it was unloaded."""
        lock = self._load_locks.get(avatar_id)
        if lock is None:
            return False
        async with lock:
            held = self._resident.get(unit, set())
            if avatar_id not in held or in_use():
                return False
            held.discard(avatar_id)
            self._used.pop((unit, avatar_id), None)
            if not any(avatar_id in ids for ids in self._resident.values()):
                self._loaded.pop(avatar_id, None)
            await _unload(unit, avatar_id)
            return True

    async def trim(self, unit: Unit, keep: int, in_use: Callable[[], set[str]]) -> tuple[str, ...]:
        """Unload from `unit` the avatars no session there uses (`in_use()`: those some do),
        the least recently used first, until at most `keep` such stay; the ones unloaded."""
        idle = sorted(
            (a for a in self._resident.get(unit, set()) if a not in in_use()),
            key=lambda a: self._used.get((unit, a), 0.0),
        )
        gone: tuple[str, ...] = ()
        for avatar_id in idle[: max(0, len(idle) - keep)]:

            def still_used(a: str = avatar_id) -> bool:
                return a in in_use()

            if await self.release(avatar_id, unit, still_used):
                gone += (avatar_id,)
        return gone

    def _save_latents(self, avatar: Avatar) -> None:
        try:
            with self._lock:
                if (
                    avatar.id not in self._deleted
                    and avatar.latents is not None
                    and avatar.latents_key
                ):
                    self.store.save_latents(avatar.id, avatar.latents, avatar.latents_key)
        except (AvatarStoreError, OSError, ValueError):
            log.warning(
                "could not store the avatar's latents",
                exc_info=True,
                extra={"avatar_id": avatar.id},
            )

    def deleted(self, avatar_id: str) -> bool:
        """Whether a delete of this avatar has begun (a session opened for it must not start)."""
        return avatar_id in self._deleted

    def begin_delete(self, avatar_id: str) -> None:
        """The first step of a delete, synchronous: from now on `ready` answers "no avatar"
        and `deleted` is true. Raises AvatarNotFoundError (unknown, or already deleted)."""
        self._check_not_deleted(avatar_id)
        if not self.store.path(avatar_id).is_dir():  # damaged or not, any avatar folder goes
            raise AvatarNotFoundError(f"no avatar {avatar_id!r}")
        self._deleted.add(avatar_id)

    async def delete(self, avatar_id: str) -> None:
        """Free engine memory and disk, after `begin_delete` and after ending its sessions."""
        if avatar_id not in self._deleted:
            self.begin_delete(avatar_id)
        job = self._jobs.get(avatar_id)
        if job is not None and job[0].cancel():  # never started: clean up for it
            with contextlib.suppress(OSError):
                job[1].unlink()
            self._jobs.pop(avatar_id, None)
            self._live.pop(avatar_id, None)
        lock = self._load_locks.get(avatar_id)
        if lock is not None:
            async with lock:  # a load under way finishes (and sees the delete) first
                pass
        self._loaded.pop(avatar_id, None)
        for unit, ids in self._resident.items():
            self._used.pop((unit, avatar_id), None)
            if avatar_id in ids:
                ids.discard(avatar_id)
                await _unload(unit, avatar_id)
        self.idle_frames.forget(avatar_id)
        self._load_locks.pop(avatar_id, None)
        self._failed.pop(avatar_id, None)

        def remove() -> None:
            with self._lock:
                self.store.delete(avatar_id)

        try:
            await asyncio.to_thread(remove)
        except OSError:
            self._deleted.discard(avatar_id)  # still there: a later delete may retry
            raise
        self._count()
        log.info("avatar deleted", extra={"avatar_id": avatar_id})

    def _count(self) -> None:
        counts: dict[str, int] = {"pending": 0, "preparing": 0, "ready": 0, "failed": 0}
        with contextlib.suppress(Exception):
            for m in self.store.list():
                status = str(m.get("status"))
                counts[status] = counts.get(status, 0) + 1
        for status, n in counts.items():
            self.metrics.avatars.labels(status).set(n)


async def _unload(unit: Unit, avatar_id: str) -> None:
    """Unload from one unit; a failure is logged. A stopped worker (its device failed, or the
    server is stopping) holds nothing any more: nothing to do."""
    if not unit.usable:
        return
    try:
        await asyncio.wrap_future(unit.worker.unload_avatar(avatar_id))
    except Exception:
        log.warning(
            "could not unload the avatar",
            exc_info=True,
            extra={"avatar_id": avatar_id, "device": unit.device},
        )
        return
    log.info("avatar unloaded", extra={"avatar_id": avatar_id, "device": unit.device})


def _failure(avatar_id: str, exc: BaseException) -> str:
    """The error a failed preparation shows, for a cause that is not the upload's fault."""
    if is_no_space(exc):
        log.warning("avatar preparation failed", extra={"avatar_id": avatar_id, "reason": NO_SPACE})
        return NO_SPACE_ERROR
    log.error(
        "avatar preparation failed",
        exc_info=exc,
        extra={"avatar_id": avatar_id, "reason": repr(exc)},
    )
    return INTERNAL_ERROR
