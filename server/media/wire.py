"""What the server and its media processes exchange: framed messages over a Unix socket and
a shared-memory ring of pictures per session.

A message is `!II` (header length, payload length), a JSON header (a dict with "op"), and a raw
payload (a tick's int16 PCM). Pictures do not travel in messages: the server copies tick k's
I420 picture into slot k % slots of the session's `FrameRing` (a file under /dev/shm, mapped
by both processes), stamps the slot with k, then sends the tick message; the media process
copies the slot out when its encoder asks for the frame and checks the stamp again, so a slot
overwritten meanwhile (the encoder a whole ring behind) is dropped, never sent torn.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import secrets
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_HEAD = struct.Struct("!II")
MAX_HEADER = 1 << 20  # an SDP offer or answer (<= 64 KiB) with room to spare
MAX_PAYLOAD = 1 << 20


class WireError(ValueError):
    """A malformed message from the other process."""


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEAD.pack(len(head), len(payload)) + head + payload


async def read_message(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next message; raises asyncio.IncompleteReadError at EOF, WireError if malformed."""
    n_head, n_payload = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if n_head > MAX_HEADER or n_payload > MAX_PAYLOAD:
        raise WireError(f"message too large ({n_head} + {n_payload} bytes)")
    try:
        header = json.loads(await reader.readexactly(n_head))
    except ValueError:
        raise WireError("message header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("message header has no op")
    payload = await reader.readexactly(n_payload) if n_payload else b""
    return header, payload


def ring_dirs() -> list[Path]:
    """Where rings may live, best first: /dev/shm (memory), then the temp dir."""
    shm = Path("/dev/shm")
    first = [shm] if shm.is_dir() and os.access(shm, os.W_OK) else []
    return [*first, Path(tempfile.gettempdir())]


class FrameRing:
    """`slots` I420 pictures of `shape` (rows, columns) uint8 with a stamp (tick k) each."""

    def __init__(self, path: Path, slots: int, shape: tuple[int, int], create: bool) -> None:
        if slots < 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"a ring needs >= 2 slots and a picture shape, got {slots}, {shape}")
        self.path = path
        self.slots = slots
        self.shape = shape
        frame = shape[0] * shape[1]
        size = 8 * slots + frame * slots
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # reserve the pages now: a full /dev/shm (64 MiB in a default container)
                # then fails here, not with SIGBUS on a later write
                os.posix_fallocate(fd, 0, size)
                self._map = mmap.mmap(fd, size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size != size:
                    raise ValueError(f"ring {path.name} has the wrong size")
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        self.stamps = np.frombuffer(self._map, np.int64, slots)
        self.frames = np.frombuffer(self._map, np.uint8, frame * slots, 8 * slots).reshape(
            slots, *shape
        )
        if create:
            self.stamps[:] = -1

    @classmethod
    def create(cls, slots: int, shape: tuple[int, int]) -> FrameRing:
        """A new ring in /dev/shm, or in the temp dir where /dev/shm has no room."""
        error: OSError | None = None
        for folder in ring_dirs():
            path = folder / f"lipstream-ring-{secrets.token_hex(8)}"
            try:
                return cls(path, slots, shape, create=True)
            except OSError as exc:
                error = exc
        raise OSError(f"no room for a frame ring of {slots} x {shape}: {error}")

    def write(self, k: int, picture: np.ndarray) -> int:
        """Put tick k's picture into its slot; returns the slot."""
        if picture.shape != self.shape:
            raise ValueError(f"a picture of {self.shape} expected, got {picture.shape}")
        slot = k % self.slots
        self.stamps[slot] = -1
        np.copyto(self.frames[slot], picture)
        self.stamps[slot] = k
        return slot

    def read(self, k: int) -> np.ndarray | None:
        """A copy of tick k's picture, or None if its slot holds another tick by now."""
        slot = k % self.slots
        if self.stamps[slot] != k:
            return None
        out = self.frames[slot].copy()
        return out if self.stamps[slot] == k else None

    def unlink(self) -> None:
        """Remove the name (the mappings stay valid until closed)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return

    def close(self) -> None:
        del self.stamps, self.frames
        self._map.close()
