"""A media process: hosts the aiortc peer connections of some of the server's sessions.

Started by `server.media.pool` as `python -c "from server.media.shard import main; main()" FD`
with FD one end of a Unix socket pair. It ignores SIGINT/SIGTERM (the server decides when it
ends: op "quit", or the socket closing when the server dies) and runs one asyncio loop:

- "open" {sid, sdp, ring, slots, shape, ice, queue, steady_bitrate, encoders}: a peer
  connection with a video track fed from the session's `FrameRing` and an audio track, its
  encoders set up by `encoders` (`EncoderTuning.as_dict`) -> reply {answer, sending} or {error};
- "tick" {sid, k} + int16 PCM payload (empty: no audio): queue tick k's picture and audio;
- "packets" {sid} -> reply {packets}; "close" {sid} -> reply once closed;
- "count" -> reply {peers, tasks, encoders} (leak checks; the tuning its encoders run with);
  "quit": close every peer and exit.
Events back: "started" {sid, kind}, "dropped" {sid, kind, n}, "state" {sid, state}.
Every 10 s it logs a stats line (sessions, frames dropped, loop lag, encode times, codecs
re-opened; `server.media.encoder_watch`, `server.ops.stall_watch`): INFO, or WARNING when frames were
dropped, the loop lagged over 100 ms or an encode took over two frame times (80 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from lipstream import logs
from server.media import encoder_tuning, encoder_watch
from server.media.link import LocalMedia, MediaEvents
from server.media.tracks import QueueTrack, video_frame
from server.media.webrtc import OfferError
from server.media.wire import FrameRing, WireError, pack, read_message
from server.ops import malloc_tuning, stall_watch
from server.settings import EncoderTuning, Settings

log = logging.getLogger(__name__)

MAX_PULLS = 1000  # per session and stats line (25 fps x 10 s = 250)
STATS_INTERVAL_S = 10.0  # a stats line this often (INFO; WARNING when something went wrong)
SLOW_ENCODE_S = 0.08  # two frame times: one encode this slow puts its queue a frame behind


class RingVideoTrack(QueueTrack):
    """A video track whose queue holds tick numbers; the picture is read from the ring when
    the encoder asks for it (a slot overwritten meanwhile counts as a dropped frame)."""

    def __init__(self, ring: FrameRing, maxsize: int, on_start: Any, on_drop: Any) -> None:
        super().__init__("video", maxsize, on_start, on_drop)
        self.ring = ring
        self.pulls: list[float] = []  # when the encoder took each picture, since the stats line
        self.deepest = 0  # the most frames waiting at a tick, since the stats line

    async def recv(self) -> av.VideoFrame:  # type: ignore[override]
        while True:
            k = await super().recv()
            picture = self.ring.read(int(k))  # type: ignore[call-overload]
            if picture is not None:
                if len(self.pulls) < MAX_PULLS:
                    self.pulls.append(time.monotonic())
                return video_frame(picture, int(k))  # type: ignore[call-overload]
            if self._on_drop is not None:
                self._on_drop("video")


class Peer:
    """One session's peer connection here: a `LocalMedia` whose video track reads the
    session's ring, reporting its events back to the server."""

    def __init__(self, shard: Shard, sid: str, msg: dict[str, Any]) -> None:
        self.ring = FrameRing(Path(msg["ring"]), int(msg["slots"]), tuple(msg["shape"]), False)
        settings = Settings(
            ice_servers=tuple(msg.get("ice", ())),
            ice_username=(msg.get("ice_auth") or [None, None])[0],
            ice_credential=(msg.get("ice_auth") or [None, None])[1],
            ice_port_range=str(msg.get("ice_ports") or ""),
            track_queue_frames=int(msg["queue"]),
            steady_bitrate=bool(msg.get("steady_bitrate", True)),
            **EncoderTuning.from_dict(msg.get("encoders", {})).as_settings(),
        )
        events = MediaEvents(
            started=lambda kind: shard.emit({"op": "started", "sid": sid, "kind": kind}),
            dropped=lambda kind: shard.note_drop(sid, kind),
            state=lambda state: shard.emit({"op": "state", "sid": sid, "state": state}),
        )
        self.video = RingVideoTrack(
            self.ring, settings.track_queue_frames, events.started, events.dropped
        )
        self.link = LocalMedia(settings, events, self.video)

    def tick(self, k: int, pcm: bytes) -> None:
        self.video.put(k)  # type: ignore[arg-type]
        self.video.deepest = max(self.video.deepest, self.video.depth)
        if pcm:
            self.link.put_audio(k, np.frombuffer(pcm, np.int16))

    async def close(self) -> None:
        await self.link.close()
        self.ring.close()


class Shard:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        lag: stall_watch.LoopLag | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.lag = lag
        self.peers: dict[str, Peer] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.dropped = 0  # video frames dropped before the encoder, all sessions

    def stats_line(self, before: dict[str, float]) -> tuple[int, str, dict[str, float]]:
        """(log level, message, encoder totals now) for the window since `before`: sessions,
        frames dropped, loop lag, encodes and their times, codec re-openings. WARNING when
        frames were dropped, the loop lagged over 100 ms or an encode took over 80 ms."""
        now = encoder_watch.STATS.take()
        lag_s, lags_over = self.lag.take_window() if self.lag is not None else (0.0, 0)
        n = now["encodes"] - before["encodes"]
        gaps, deepest = self._pull_gaps()
        fields = {
            "sessions": len(self.peers),
            "dropped": self.dropped,
            "lag_max_ms": round(lag_s * 1e3, 1),
            "lags_over_100ms": lags_over,
            "encodes": int(n),
            "encode_ms_mean": round(1e3 * (now["encode_s"] - before["encode_s"]) / n, 2)
            if n
            else 0,
            "encode_ms_max": round(now["slowest_s"] * 1e3, 1),
            "codecs_reopened": int(now["reopened"] - before["reopened"]),
            # the encoders' pace: intervals between the pictures they took (40 ms when they
            # keep up), and the deepest encoder queue any session had
            "pull_ms_p99": round(float(np.percentile(gaps, 99)) * 1e3, 1) if gaps else 0,
            "pull_ms_max": round(max(gaps) * 1e3, 1) if gaps else 0,
            "queue_deepest": deepest,
        }
        bad = self.dropped or lags_over or now["slowest_s"] > SLOW_ENCODE_S
        self.dropped = 0
        text = "media stats: " + " ".join(f"{k}={v}" for k, v in fields.items())
        return (logging.WARNING if bad else logging.INFO), text, now

    def _pull_gaps(self) -> tuple[list[float], int]:
        """The intervals between pictures each session's encoder took, and the deepest queue,
        since the last call (each track keeps its last pull, to measure from)."""
        gaps: list[float] = []
        deepest = 0
        for peer in self.peers.values():
            video = peer.video
            pulls = video.pulls
            gaps.extend(b - a for a, b in itertools.pairwise(pulls))
            video.pulls = pulls[-1:]
            deepest = max(deepest, video.deepest)
            video.deepest = 0
        return gaps, deepest

    async def report_stats(self, interval_s: float = STATS_INTERVAL_S) -> None:
        before = encoder_watch.STATS.take()
        while True:
            await asyncio.sleep(interval_s)
            level, text, before = self.stats_line(before)
            log.log(level, text)

    def emit(self, header: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(pack(header))

    def note_drop(self, sid: str, kind: str) -> None:
        if kind == "video":
            self.dropped += 1
        self.emit({"op": "dropped", "sid": sid, "kind": kind})

    def reply(self, rid: int, **fields: Any) -> None:
        self.emit({"op": "reply", "rid": rid, **fields})

    async def run(self) -> None:
        self.emit({"op": "hello", "pid": os.getpid()})
        self.spawn(self.report_stats())
        try:
            while True:
                try:
                    msg, payload = await read_message(self.reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the server is gone
                if msg["op"] == "quit":
                    return
                self.handle(msg, payload)
        except WireError:
            log.exception("bad message from the server")
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await asyncio.gather(*(p.close() for p in self.peers.values()), return_exceptions=True)
            self.peers.clear()
            with contextlib.suppress(Exception):
                self.writer.close()

    def handle(self, msg: dict[str, Any], payload: bytes) -> None:
        op, sid = msg["op"], str(msg.get("sid", ""))
        if op == "tick":
            peer = self.peers.get(sid)
            if peer is not None:
                peer.tick(int(msg["k"]), payload)
            return
        rid = int(msg.get("rid", -1))
        if op == "open":
            self.spawn(self.open(rid, sid, msg), f"open-{sid}")
        elif op == "close":
            self.spawn(self.close(rid, sid), f"close-{sid}")
        elif op == "packets":
            self.spawn(self.packets(rid, sid), f"packets-{sid}")
        elif op == "count":
            tuning = encoder_tuning.applied()
            self.reply(
                rid,
                peers=len(self.peers),
                tasks=len(asyncio.all_tasks()),
                encoders=tuning.as_dict() if tuning else None,
            )
        else:
            self.reply(rid, error=f"unknown op {op!r}")

    def spawn(self, coro: Any, name: str | None = None) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "media task failed", exc_info=task.exception(), extra={"task": task.get_name()}
            )

    async def open(self, rid: int, sid: str, msg: dict[str, Any]) -> None:
        try:
            peer = Peer(self, sid, msg)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.reply(rid, error=f"media process could not open the session: {exc}")
            return
        self.peers[sid] = peer
        try:
            answer, sending = await peer.link.negotiate(str(msg["sdp"]))
        except OfferError as exc:
            self.peers.pop(sid, None)
            await peer.close()
            self.reply(rid, error=str(exc), offer=True)
            return
        except Exception as exc:
            self.peers.pop(sid, None)
            await peer.close()
            self.reply(rid, error=f"media process failed: {type(exc).__name__}")
            return
        self.reply(rid, answer=answer, sending=sorted(sending))

    async def close(self, rid: int, sid: str) -> None:
        peer = self.peers.pop(sid, None)
        if peer is not None:
            await peer.close()
        self.reply(rid, closed=peer is not None)

    async def packets(self, rid: int, sid: str) -> None:
        peer = self.peers.get(sid)
        n = -1
        if peer is not None:
            with contextlib.suppress(Exception):
                n = await peer.link.packets_received()
        self.reply(rid, packets=n)


async def _serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    # stalls here are logged (to the server's log) with the collector pause that caused them
    lag = stall_watch.LoopLag(gc_pauses=stall_watch.GcPauses().install()).start()
    try:
        await Shard(reader, writer, lag).run()
    finally:
        await lag.stop()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(  # the server's line format, its fields included, marked with this process
        level=os.environ.get("LIPSTREAM_MEDIA_LOG_LEVEL", "WARNING").upper(),
        fmt="%(asctime)s %(levelname)s media[%(process)d] %(name)s: %(message)s",
    )
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # aiortc's closing-task noise
    malloc_tuning.start_from_env()  # the server's trimmer interval
    if os.environ.get(stall_watch.GC_FREEZE_ENV, "1") != "0":
        stall_watch.freeze_heap()  # aiortc, PyAV and numpy's modules: never walked again
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_serve(int(sys.argv[1])))
