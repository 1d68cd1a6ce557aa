"""Media processes (`media_processes` > 0): the server side of `server.media.shard`.

`MediaPool` starts the processes with the server, gives each new session a `ShardMedia` on
the least loaded one, and stops them with the server. A tick costs the server's event loop
one picture copy into shared memory and one short message (instead of aiortc's ~2.5 ms of
RTP/SRTP/encoder plumbing). A media process that dies takes its sessions' peers with it:
those sessions see the state "failed" and end; the pool starts a fresh process in its place
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from server.media.link import MediaEvents, MediaHost, PeerLink
from server.media.pictures import to_i420
from server.media.webrtc import OfferError
from server.media.wire import FrameRing, WireError, pack, read_message
from server.ops import stall_watch
from server.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 10.0
MAX_BACKLOG_BYTES = 4 << 20  # unsent ticks to one process beyond this are dropped
RING_SPARE_SLOTS = 4  # beyond the encoder queue, so a queued tick's slot is not reused
RESTART_DELAY_S = 0.5
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # the child imports `server` from here


class MediaProcessError(RuntimeError):
    """The media process is gone or did not answer."""


class MediaShardProcess:
    """One media process and the socket to it."""

    def __init__(
        self,
        index: int,
        on_gone: Callable[[MediaShardProcess], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.index = index
        self.env = env or {}  # added to this process's environment for the child
        self.on_gone = on_gone  # called once when the process ends without being asked to
        self.links: dict[str, ShardMedia] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.alive = False
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rids = itertools.count()

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.to_thread(_spawn, theirs.fileno(), self.env)
        finally:
            theirs.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=ours)
        try:
            hello, _ = await asyncio.wait_for(read_message(reader), START_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, WireError) as exc:
            await self.stop()
            raise MediaProcessError(f"media process {self.index} did not start: {exc!r}") from None
        self.alive = True
        self._reader_task = asyncio.create_task(self._read(reader), name=f"media-{self.index}")
        log.info("media process started", extra={"index": self.index, "pid": hello.get("pid")})

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg, _ = await read_message(reader)
                self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the process ended
        except WireError:
            log.exception("bad message from a media process", extra={"index": self.index})
        finally:
            self._gone()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "reply":
            fut = self._pending.pop(int(msg.get("rid", -1)), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        link = self.links.get(str(msg.get("sid")))
        if link is None:
            return
        kind = str(msg.get("kind"))
        if op == "started":
            link.events.started(kind)
        elif op == "dropped":
            link.events.dropped(kind)
        elif op == "state":
            link.peer_state = str(msg.get("state"))
            link.events.state(link.peer_state)

    def _gone(self) -> None:
        if not self.alive:
            return
        self.alive = False
        code = self.proc.poll() if self.proc is not None else None
        log.error("media process ended", extra={"index": self.index, "returncode": code})
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(MediaProcessError("the media process ended"))
        self._pending.clear()
        for link in list(self.links.values()):
            link.peer_state = "failed"
            link.events.state("failed")
        if self.on_gone is not None:
            self.on_gone(self)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        """Write a message without waiting; False if the process is gone or far behind."""
        w = self.writer
        if not self.alive or w is None or w.is_closing():
            return False
        if w.transport.get_write_buffer_size() > MAX_BACKLOG_BYTES:
            return False
        w.write(pack(header, payload))
        return True

    async def request(self, header: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._rids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if not self.send({**header, "rid": rid}):
            self._pending.pop(rid, None)
            raise MediaProcessError("the media process is not running")
        try:
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        finally:
            self._pending.pop(rid, None)

    async def stop(self) -> None:
        if self.writer is not None:
            self.send({"op": "quit"})
            self.alive = False  # an ending asked for, not a failure
            with contextlib.suppress(Exception):
                self.writer.close()
        proc = self.proc
        if proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), QUIT_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader_task, QUIT_TIMEOUT_S)
        self.alive = False


def _spawn(fd: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -c ... main() FD` with this package importable, FD inherited and `env` added."""
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-c", "from server.media.shard import main; main()", str(fd)],
        pass_fds=(fd,),
        env={**os.environ, **env, "PYTHONPATH": path},
        stdin=subprocess.DEVNULL,
    )


class ShardMedia(PeerLink):
    """A session's peer connection in a media process."""

    def __init__(
        self,
        shard: MediaShardProcess,
        sid: str,
        settings: Settings,
        events: MediaEvents,
        picture_shape: tuple[int, int],
    ) -> None:
        self.shard = shard
        self.sid = sid
        self.settings = settings
        self.events = events
        self.picture_shape = picture_shape
        self.peer_state: str | None = None
        self.ring: FrameRing | None = None
        self._closed = False

    async def negotiate(self, sdp: str) -> tuple[str, set[str]]:
        s = self.settings
        slots = s.track_queue_frames + RING_SPARE_SLOTS
        try:
            self.ring = FrameRing.create(slots, self.picture_shape)
        except OSError as exc:
            raise MediaProcessError(str(exc)) from None
        self.shard.links[self.sid] = self
        try:
            reply = await self.shard.request(
                {
                    "op": "open",
                    "sid": self.sid,
                    "sdp": sdp,
                    "ring": str(self.ring.path),
                    "slots": slots,
                    "shape": list(self.picture_shape),
                    "ice": list(s.ice_servers),
                    "ice_auth": [s.ice_username, s.ice_credential],
                    "ice_ports": s.ice_port_range,
                    "queue": s.track_queue_frames,
                    "steady_bitrate": s.steady_bitrate,
                    "encoders": s.encoder_tuning().as_dict(),
                }
            )
        except (MediaProcessError, TimeoutError) as exc:
            raise OfferError(f"the media process could not take the session: {exc}") from None
        finally:
            self.ring.unlink()  # the process has it mapped (or never will)
        if "error" in reply:
            raise OfferError(str(reply["error"]))
        self.peer_state = "new"
        return str(reply["answer"]), set(reply["sending"])

    def send(self, k: int, picture: np.ndarray, pcm: np.ndarray | None) -> None:
        if self._closed or self.ring is None:
            return
        self.ring.write(k, to_i420(picture))
        payload = b"" if pcm is None else np.asarray(pcm, np.int16).tobytes()
        if not self.shard.send({"op": "tick", "sid": self.sid, "k": k}, payload):
            self.events.dropped("video")

    @property
    def state(self) -> str | None:
        return None if self._closed else self.peer_state

    async def packets_received(self) -> int:
        reply = await self.shard.request({"op": "packets", "sid": self.sid})
        return int(reply.get("packets", -1))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(MediaProcessError, TimeoutError):
            if self.shard.alive:
                await self.shard.request({"op": "close", "sid": self.sid})
        self.shard.links.pop(self.sid, None)
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class MediaPool(MediaHost):
    """`count` media processes; sessions go to the one with the fewest."""

    def __init__(self, settings: Settings, count: int) -> None:
        if count < 1:
            raise ValueError(f"a media pool needs >= 1 process, got {count}")
        self.settings = settings
        self._env = {stall_watch.GC_FREEZE_ENV: "1" if settings.gc_freeze else "0"}
        self.shards = [MediaShardProcess(i, self._restart, self._env) for i in range(count)]
        self._sids = itertools.count()
        self._restarts: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.shards))

    async def stop(self) -> None:
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.shards), return_exceptions=True)

    def link(self, events: MediaEvents, picture_shape: tuple[int, int]) -> PeerLink:
        live = [s for s in self.shards if s.alive]
        for s in self.shards:
            if not s.alive:
                self._restart(s)  # where an earlier restart failed
        if not live:
            raise MediaProcessError("no media process is running (restarting)")
        shard = min(live, key=lambda s: len(s.links))
        return ShardMedia(shard, f"m{next(self._sids)}", self.settings, events, picture_shape)

    def _restart(self, old: MediaShardProcess) -> None:
        if any(t.get_name() == f"restart-{old.index}" for t in self._restarts):
            return

        async def restart() -> None:
            await old.stop()
            await asyncio.sleep(RESTART_DELAY_S)  # no tight loop if it keeps dying
            fresh = MediaShardProcess(old.index, self._restart, self._env)
            try:
                await fresh.start()
            except MediaProcessError:
                log.exception("media process restart failed", extra={"index": old.index})
                return
            self.shards[old.index] = fresh

        task = asyncio.create_task(restart(), name=f"restart-{old.index}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def counts(self) -> list[dict[str, Any]]:
        """Each live process's peers, asyncio tasks (for leak checks) and encoder tuning."""
        return [await s.request({"op": "count"}) for s in self.shards if s.alive]

    def available(self) -> bool:
        return any(s.alive for s in self.shards)

    def info(self) -> dict[str, object]:
        return {
            "media_processes": len(self.shards),
            "media_alive": sum(s.alive for s in self.shards),
        }
