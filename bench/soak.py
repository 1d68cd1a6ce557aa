"""Soak test: `lipstream bench --soak --sessions N --minutes M`.

A real `lipstream serve` subprocess on loopback (its settings from the usual `LIPSTREAM_*`
variables: engine, models, device, backend; `--engine` here overrides the engine) and N real
aiortc clients in this process, each pushing speech at real time over its websocket
(utterances of 2-4 s with 0.5-1.5 s pauses) and receiving video and audio over WebRTC.

Measured after a warm-up (the first 20% of the run, at most 60 s):
- delivered fps per session (video frames received / window), p50/p99 frame interval at the
  client, frames missing from the received RTP timestamps (gaps) and the server's own counts
  over the same window (frames dropped before the encoder, late/held frames; `*_total`:
  since the session opened);
- the RSS of the server process and its children (media processes; from /proc) and its GPU
  memory (nvidia-smi, by pid, where present): at the end of the warm-up, at the last sample
  with every session open (`lipstream_sessions_active`), the growth between; sampled every
  5 s with the server's frame counters (sent, speech, dropped, late, rendered), engine step
  times and the largest speech backlog (`rendered_fps`, `speech_fps`, `worker_step_ms_mean`,
  `speech_backlog_s_max` over the window).

The result is a JSON document (printed, and written to `out` where given).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import VIDEO_TIME_BASE, MediaStreamTrack

from bench.loopback import LoopbackClient
from engines.pipeline.scheduler import LAUNCH_PHASES
from lipstream.integrations.session_client import track_frames
from server.metrics import FIRST_PARTS

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME_PTS = 3600  # 90 kHz / 25 fps
SAMPLE_EVERY_S = 5.0
CONNECT_SLACK_S = 15.0  # client processes: their start and connect, before their own warm-up


@dataclass
class VideoStats:
    """Streaming per-session video figures (constant memory per frame: one double)."""

    frames: int = 0
    missing: int = 0
    intervals: array = field(default_factory=lambda: array("d"))
    window_frames: int = 0
    _last_t: float | None = None
    _last_pts: int | None = None
    measuring: bool = False

    def add(self, t: float, pts: int) -> None:
        self.frames += 1
        if self._last_pts is not None and pts > self._last_pts:
            gap = round((pts - self._last_pts) / FRAME_PTS)
            if self.measuring and gap > 1:
                self.missing += gap - 1
        if self.measuring:
            self.window_frames += 1
            if self._last_t is not None:
                self.intervals.append(t - self._last_t)
        self._last_t, self._last_pts = t, pts


class SoakClient(LoopbackClient):
    """A loopback client that keeps statistics instead of the frames (hours of them)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(base_url, headers=headers)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video = VideoStats()
        self.audio_frames = 0

    async def first_frames(self, n: int, within: float) -> None:
        deadline = time.monotonic() + within
        while self.video.frames < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.video.frames} of {n} video frames within {within} s")
            await asyncio.sleep(0.05)

    async def _consume(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            if isinstance(frame, av.VideoFrame):
                self.video.add(time.monotonic(), int(frame.pts or 0))
            else:
                self.audio_frames += 1


class TimestampDecoder:
    """Stands in for a video decoder in a soak client: one tiny frame per received frame,
    carrying its RTP timestamp. The soak only times frames and counts gaps in their
    timestamps; decoding a dozen 720p streams costs the clients 1-2 cores of the host they
    share with the server (a real viewer decodes on its own machine)."""

    def decode(self, encoded: Any) -> list[av.VideoFrame]:
        frame = av.VideoFrame(16, 16, "yuv420p")
        frame.pts = encoded.timestamp
        frame.time_base = VIDEO_TIME_BASE
        return [frame]


def skip_video_decoding() -> None:
    """From now on this process's aiortc receivers hand on `TimestampDecoder` frames instead
    of decoded video (audio is decoded as before). For soak client processes only."""
    import aiortc.rtcrtpreceiver as receiver
    from aiortc.codecs import get_decoder

    def decoder(codec: Any) -> Any:
        if codec.mimeType.lower().startswith("video/"):
            return TimestampDecoder()
        return get_decoder(codec)

    receiver.get_decoder = decoder  # type: ignore[assignment]


def speech(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Vowel-like int16 speech: a pulse train through formants, syllable envelope."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 110 + 25 * np.sin(2 * np.pi * 0.6 * t)
    voiced = sum(np.sin(2 * np.pi * np.cumsum(f0 * k) / SAMPLE_RATE) / k for k in range(1, 12)) * (
        1 + 0.3 * np.sin(2 * np.pi * 700 * t)
    )
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None) ** 2
    x = voiced * envelope
    return (0.5 * x / max(float(np.max(np.abs(x))), 1e-6) * 32767).astype(np.int16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


COUNTERS = {
    "lipstream_frames_sent_total": "sent",
    'lipstream_frames_sent_total{kind="speech"}': "speech",
    "lipstream_frames_dropped_total": "dropped",
    "lipstream_late_frames_total": "late",
    "lipstream_frames_rendered_total": "rendered",
    "lipstream_worker_step_seconds_count": "steps",
    "lipstream_worker_step_seconds_sum": "step_s",
    "lipstream_worker_launch_seconds_sum": "launch_s",
    "lipstream_worker_queued_frames": "queued",
    **{
        f'lipstream_worker_launch_phase_seconds_total{{phase="{phase}"}}': f"launch_{phase}_s"
        for phase in LAUNCH_PHASES
    },
    "lipstream_speech_backlog_seconds": "backlog_s",
    "lipstream_worker_turnaround_seconds": "turnaround_s",
    "lipstream_sessions_active": "open",
    # the server's stalls (server.ops.stall_watch): lag samples, those within 100 / 250 ms;
    # full collections and their seconds; malloc trims, their seconds, those within 50 ms
    "lipstream_event_loop_lag_seconds_count": "lag_n",
    'lipstream_event_loop_lag_seconds_bucket{le="0.1"}': "lag_le_100ms",
    'lipstream_event_loop_lag_seconds_bucket{le="0.25"}': "lag_le_250ms",
    'lipstream_gc_pause_seconds_count{generation="2"}': "gc2_n",
    'lipstream_gc_pause_seconds_sum{generation="2"}': "gc2_s",
    'lipstream_gc_pause_seconds_bucket{generation="2",le="0.05"}': "gc2_le_50ms",
    "lipstream_malloc_trim_seconds_count": "trim_n",
    "lipstream_malloc_trim_seconds_sum": "trim_s",
    'lipstream_malloc_trim_seconds_bucket{le="0.05"}': "trim_le_50ms",
}


async def server_counters(http: httpx.AsyncClient) -> dict[str, float]:
    """The server's frame counters (sent: all kinds; speech; dropped before the encoder;
    late; rendered), engine step totals, queued frames and the largest speech backlog, from
    /metrics (a series with labels counts under its name and, where listed, its own key)."""
    out = dict.fromkeys(COUNTERS.values(), 0.0)
    try:
        text = (await http.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        for key in {series.split("{", 1)[0], series}:
            if key in COUNTERS:
                out[COUNTERS[key]] += float(value)
    return out


def rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` and of its media processes (other children, such as
    torch.compile's worker pool that goes away after the warm-up, are left out)."""
    parts = rss_parts(pid)
    return sum(parts.values()) if parts else None


def rss_parts(pid: int) -> dict[str, int]:
    """`rss_bytes` by part: the server's anonymous, file-backed and shared-memory pages
    (/proc status RssAnon / RssFile / RssShmem, which add up to its VmRSS; pinned CUDA host
    memory is anonymous) and its media processes' total; empty where /proc cannot be read."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out["server_" + key[3:].lower()] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    media = [c for c in _descendants(pid) if _is_media_process(c)]
    out["media"] = sum(_rss_one(c) or 0 for c in media)
    return out


def _is_media_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"server.media.shard" in fh.read()
    except OSError:
        return False


def _rss_one(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def gpu_bytes(pid: int) -> int | None:
    """GPU memory the process holds (nvidia-smi), None where that cannot be read."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1]) * 1024 * 1024
    return None


class ServerProcess:
    """`lipstream serve` on a free loopback port, with a fresh avatars folder."""

    def __init__(self, sessions: int, engine: str | None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="lipstream-soak-")
        cmd = [
            sys.executable,
            "-c",
            "from lipstream.cli import main; main()",
            "serve",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--avatars-dir",
            str(Path(self.tmp.name) / "avatars"),
            "--demo-avatar",
            "--max-sessions",
            str(sessions + 1),
            "--log-level",
            "warning",
        ]
        if engine:
            cmd += ["--engine", engine]
        env = {**os.environ, "LIPSTREAM_AUDIO_BURST_S": "60"}
        env.pop("LIPSTREAM_API_KEY", None)
        self.proc = subprocess.Popen(cmd, env=env)

    async def ready(self, http: httpx.AsyncClient, within: float = 600.0) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode})")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    listed = (await http.get("/v1/avatars")).json()["avatars"]
                    if listed and listed[0]["status"] == "ready":
                        return str(listed[0]["id"])
                    if listed and listed[0]["status"] == "failed":
                        raise RuntimeError(f"the demo avatar failed: {listed[0]['error']}")
            await asyncio.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.tmp.cleanup()


async def _speak(client: SoakClient, stop_at: float, seed: int) -> int:
    """Utterances at real time until `stop_at`; returns how many were sent."""
    rng = np.random.default_rng(seed)
    sent = 0
    while time.monotonic() < stop_at - 1.0:
        pcm = speech(float(rng.uniform(2.0, 4.0)), rng)
        await client.send_pcm(pcm, chunk=320, realtime=True)
        await client.send_json({"type": "end"})
        sent += 1
        await asyncio.sleep(float(rng.uniform(0.5, 1.5)))
    return sent


def _pct(values: Any, q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


async def soak(
    sessions: int,
    minutes: float,
    engine: str | None = None,
    server_url: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    if sessions < 1 or minutes <= 0:
        raise ValueError("the soak needs sessions >= 1 and minutes > 0")
    duration = minutes * 60.0
    warmup = min(60.0, 0.2 * duration)
    server = None if server_url else ServerProcess(sessions, engine)
    base = server_url or (server.base_url if server else "")
    pid = server.proc.pid if server else server_pid
    if pid is not None and rss_bytes(pid) is None:
        raise ValueError(f"no process {pid} to sample (--soak-pid: the server's pid)")
    clients: list[SoakClient] = []
    samples: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            avatar_id = await (server.ready(http) if server else _first_ready(http))
            engine_name = (await http.get("/readyz")).json().get("engine")
            for _ in range(sessions):
                client = SoakClient(base)
                clients.append(client)
                await client.open(avatar_id)
                await client.connect_audio()
            await asyncio.gather(*(c.first_frames(5, within=60) for c in clients))
            t0 = time.monotonic()
            stop_at = t0 + duration
            seed = int(os.environ.get("LIPSTREAM_SOAK_SEED", "0"))  # client processes differ
            speakers = [
                asyncio.create_task(_speak(c, stop_at, seed + i)) for i, c in enumerate(clients)
            ]
            measuring = False
            while time.monotonic() < stop_at:
                now = time.monotonic() - t0
                if not measuring and now >= warmup:
                    measuring = True
                    for c in clients:
                        c.video.measuring = True
                    window_start = time.monotonic()
                    at_start = [await _info(http, c) for c in clients]
                samples.append(await _sample(http, now, pid))
                await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.1, stop_at - time.monotonic())))
            for c in clients:
                c.video.measuring = False
            window = time.monotonic() - window_start
            utterances = await asyncio.gather(*speakers)
            infos = [await _info(http, c) for c in clients]
            for info, start in zip(infos, at_start, strict=True):
                for key in ("frames_dropped", "held_frames", "audio_dropped"):
                    info[key + "_in_window"] = int(info.get(key) or 0) - int(start.get(key) or 0)
            if pid is not None:
                samples.append(await _sample(http, time.monotonic() - t0, pid))
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
        if server is not None:
            await asyncio.to_thread(server.stop)
    return _report(
        sessions, minutes, warmup, window, engine_name, clients, infos, utterances, samples
    )


async def _sample(http: httpx.AsyncClient, t: float, pid: int | None) -> dict[str, Any]:
    """One sample: time, the server's frame counters, and (with its pid) RSS and GPU memory."""
    sample: dict[str, Any] = {"t": round(t, 1), **await server_counters(http)}
    if pid is not None:
        parts = rss_parts(pid)  # one read of /proc for both
        sample["rss"] = sum(parts.values()) if parts else None
        sample["rss_parts"] = parts
        sample["gpu"] = await asyncio.to_thread(gpu_bytes, pid)
    return sample


async def _info(http: httpx.AsyncClient, client: SoakClient) -> dict[str, Any]:
    return dict((await http.get(f"/v1/sessions/{client.session['session_id']}")).json())


async def _first_ready(http: httpx.AsyncClient) -> str:
    for a in (await http.get("/v1/avatars")).json()["avatars"]:
        if a["status"] == "ready":
            return str(a["id"])
    raise RuntimeError("the server has no ready avatar")


def _report(
    sessions: int,
    minutes: float,
    warmup: float,
    window: float,
    engine_name: str | None,
    clients: list[SoakClient],
    infos: list[dict[str, Any]],
    utterances: list[int],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    per = []
    for c, info, n in zip(clients, infos, utterances, strict=True):
        iv = c.video.intervals
        per.append(
            {
                "fps": round(c.video.window_frames / window, 2),
                "frame_interval_ms_p50": _ms(_pct(iv, 50)),
                "frame_interval_ms_p99": _ms(_pct(iv, 99)),
                "frame_interval_ms_max": _ms(max(iv) if len(iv) else None),
                "frames_missing_at_client": c.video.missing,
                # after the warm-up (the window); *_total: since the session opened
                "server_frames_dropped": info.get("frames_dropped_in_window"),
                "server_frames_dropped_total": info.get("frames_dropped"),
                "server_held_frames": info.get("held_frames_in_window"),
                "server_audio_dropped": info.get("audio_dropped_in_window"),
                "speech_frames": info.get("speech_frames"),
                "utterances": n,
                "latency_ms": info.get("latency_ms"),
                "first_frame_ms": info.get("first_frame_ms"),
                "first_frame_parts_ms": info.get("first_frame_parts_ms"),
                "playout_at_end": info.get("playout"),
            }
        )
    all_iv: list[float] = [x for c in clients for x in c.video.intervals]
    return {
        "sessions": sessions,
        "minutes": minutes,
        "engine": engine_name,
        "warmup_s": round(warmup, 1),
        "window_s": round(window, 1),
        **_totals(per),
        "frame_interval_ms_p99": _ms(_pct(all_iv, 99)),
        # memory, engine and stall figures: after the warm-up, while every session was open
        **_window_figures(samples, sessions, warmup),
        "per_session": per,
        "samples": samples,
    }


def _totals(per: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "fps_min": min(float(p["fps"] or 0.0) for p in per),
        "fps_mean": round(float(np.mean([p["fps"] for p in per])), 2),
        "frames_missing_at_client": sum(p["frames_missing_at_client"] for p in per),
        "server_frames_dropped": sum(int(p["server_frames_dropped"] or 0) for p in per),
        "server_frames_dropped_total": sum(int(p["server_frames_dropped_total"] or 0) for p in per),
        "server_held_frames": sum(int(p["server_held_frames"] or 0) for p in per),
        **first_frame_medians(per),
    }


def first_frame_medians(per: list[dict[str, Any]]) -> dict[str, Any]:
    """The sessions' first-frame p50s and the parts of their first frames, medians over the
    sessions (the parts' medians need not add up to the whole's)."""
    return {
        "first_frame_ms_p50_median": _median_of(per, "first_frame_ms", "p50"),
        "first_frame_parts_ms_median": {
            part: _median_of(per, "first_frame_parts_ms", part) for part in FIRST_PARTS
        },
    }


def _median_of(per: list[dict[str, Any]], key: str, part: str) -> float | None:
    values = [p[key][part] for p in per if (p.get(key) or {}).get(part) is not None]
    return round(float(np.median(values)), 1) if values else None


def _max_ms(samples: list[dict[str, Any]], key: str) -> float | None:
    """The largest of a gauge in seconds over `samples`, in ms (None: the server has none)."""
    values = [s[key] for s in samples if key in s]
    return round(1e3 * max(values), 1) if values else None


def _engine(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    """Over the window: frames the engine made and speech frames played per second, the mean
    engine step and launch times, and the largest speech backlog (speech received and not
    yet played; it grows without bound when the engine cannot keep up)."""
    after = [s for s in samples if s["t"] >= warmup and "rendered" in s]
    if len(after) < 2:
        return {}
    a, b = after[0], after[-1]
    dt = max(b["t"] - a["t"], 1e-9)
    steps = b["steps"] - a["steps"]

    def per_step(key: str, scale: float = 1.0) -> float | None:
        return round(scale * (b[key] - a[key]) / steps, 2) if steps else None

    return {
        "rendered_fps": round((b["rendered"] - a["rendered"]) / dt, 1),
        "speech_fps": round((b["speech"] - a["speech"]) / dt, 1),
        "worker_step_ms_mean": per_step("step_s", 1e3),
        "worker_launch_ms_mean": per_step("launch_s", 1e3),
        "worker_launch_phase_ms_mean": {
            phase: per_step(f"launch_{phase}_s", 1e3) for phase in LAUNCH_PHASES
        },
        "worker_frames_per_step": per_step("rendered"),
        "speech_backlog_s_max": round(max(s["backlog_s"] for s in after), 2),
        "speech_backlog_s_end": round(b["backlog_s"], 2),
        # the worker's turnaround at lead_quantile (server.session.turnaround), over the window
        "turnaround_ms_max": _max_ms(after, "turnaround_s"),
        "turnaround_ms_end": _max_ms([b], "turnaround_s"),
    }


def _stalls(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    """Over the window, the server process's stalls: event-loop lags over 100 and 250 ms
    (each over 250 ms can overrun the media queues), full collections (count, slowest bucket
    passed: how many over 50 ms, mean ms) and malloc trims (count, over 50 ms, mean ms)."""
    after = [s for s in samples if s["t"] >= warmup and "lag_n" in s]
    if len(after) < 2:
        return {}
    a, b = after[0], after[-1]

    def grew(key: str) -> float:
        return b[key] - a[key]

    def mean_ms(total: str, n: str) -> float | None:
        return round(1e3 * grew(total) / grew(n), 2) if grew(n) else None

    return {
        "stalls": {
            "loop_lags_over_100ms": int(grew("lag_n") - grew("lag_le_100ms")),
            "loop_lags_over_250ms": int(grew("lag_n") - grew("lag_le_250ms")),
            "gc_full_collections": int(grew("gc2_n")),
            "gc_full_over_50ms": int(grew("gc2_n") - grew("gc2_le_50ms")),
            "gc_full_ms_mean": mean_ms("gc2_s", "gc2_n"),
            "malloc_trims": int(grew("trim_n")),
            "malloc_trims_over_50ms": int(grew("trim_n") - grew("trim_le_50ms")),
            "malloc_trim_ms_mean": mean_ms("trim_s", "trim_n"),
        }
    }


def _memory(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup]
    at_warm = after[0] if after else (samples[-1] if samples else {})
    last = samples[-1] if samples else {}
    rss = [s["rss"] for s in after if s.get("rss")]
    gpu = [s["gpu"] for s in after if s.get("gpu")]
    parts = [s["rss_parts"] for s in after if s.get("rss_parts")]
    return {
        # where the growth is: server anon / file / shmem pages, media processes
        "rss_growth_parts_mb": (
            {k: _mb(parts[-1].get(k, 0) - v) for k, v in parts[0].items()}
            if len(parts) >= 2
            else None
        ),
        "rss_mb_after_warmup": _mb(at_warm.get("rss")),
        "rss_mb_end": _mb(last.get("rss")),
        "rss_growth_mb": _mb(rss[-1] - rss[0]) if len(rss) >= 2 else None,
        "rss_mb_max": _mb(max(rss)) if rss else None,
        "gpu_mb_after_warmup": _mb(at_warm.get("gpu")),
        "gpu_mb_end": _mb(last.get("gpu")),
        "gpu_growth_pct": round(100.0 * (gpu[-1] - gpu[0]) / gpu[0], 3) if len(gpu) >= 2 else None,
    }


async def soak_with_client_processes(
    sessions: int,
    minutes: float,
    processes: int,
    server_url: str,
    server_pid: int | None = None,
    decode: bool = True,
) -> dict[str, Any]:
    """The soak with its clients spread over `processes` child processes (one Python process
    receiving and decoding a dozen 720p streams is itself GIL-bound): each child soaks its
    share of the sessions against `server_url`; this process samples the server's memory and
    merges the children's reports. `decode=False`: the children skip video decoding
    (`skip_video_decoding`)."""
    if processes < 2 or sessions < processes:
        raise ValueError("client processes need 2 <= processes <= sessions")
    if server_pid is not None and rss_bytes(server_pid) is None:
        raise ValueError(f"no process {server_pid} to sample (--soak-pid: the server's pid)")
    shares = [sessions // processes + (i < sessions % processes) for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="lipstream-soak-") as tmp:
        outs = [Path(tmp) / f"part{i}.json" for i in range(processes)]
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from lipstream.cli import main; main()",
                "bench",
                "--soak",
                "--sessions",
                str(n),
                "--minutes",
                str(minutes),
                "--soak-url",
                server_url,
                "--soak-out",
                str(out),
                *(() if decode else ("--soak-no-decode",)),
                stdout=asyncio.subprocess.DEVNULL,
                env={**os.environ, "LIPSTREAM_SOAK_SEED": str(1000 * (i + 1))},
            )
            for i, (n, out) in enumerate(zip(shares, outs, strict=True))
        ]
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        waiting = asyncio.gather(*(c.wait() for c in children))
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as http:
            while not waiting.done():
                samples.append(await _sample(http, time.monotonic() - t0, server_pid))
                await asyncio.wait({waiting}, timeout=SAMPLE_EVERY_S)
        codes = await waiting
        if any(codes):
            raise RuntimeError(f"soak client processes failed: exit codes {codes}")
        parts = [json.loads(out.read_text()) for out in outs]
    per = [p for part in parts for p in part["per_session"]]
    warmup = max(float(part["warmup_s"]) for part in parts) + CONNECT_SLACK_S
    return {
        "sessions": sessions,
        "minutes": minutes,
        "engine": parts[0]["engine"],
        "client_processes": processes,
        "client_decodes_video": decode,
        "warmup_s": round(warmup, 1),
        "window_s": min(float(part["window_s"]) for part in parts),
        **_totals(per),
        # the worst of the processes' p99s (their intervals are not kept)
        "frame_interval_ms_p99": max(float(part["frame_interval_ms_p99"] or 0) for part in parts),
        # memory, engine and stall figures: after the warm-up, while every session was open
        **_window_figures(samples, sessions, warmup),
        "per_session": per,
        "samples": samples,
    }


def _window_figures(samples: list[dict[str, Any]], sessions: int, warmup: float) -> dict[str, Any]:
    held = all_open(samples, sessions)
    return {
        "samples_all_open": len(held),
        **_memory(held, warmup),
        **_engine(held, warmup),
        **_stalls(held, warmup),
    }


def all_open(samples: list[dict[str, Any]], sessions: int) -> list[dict[str, Any]]:
    """The samples taken while the server had at least `sessions` sessions open, from the
    first such sample to the last one: the soak's window, without the ramp-up of the client
    processes' sessions or the teardown of the first ones to finish (a teardown sample reads
    hundreds of MB less RSS). Samples without a session count are all kept."""
    if not any("open" in s for s in samples):
        return samples
    full = [n for n, s in enumerate(samples) if s.get("open", 0) >= sessions]
    return samples[full[0] : full[-1] + 1] if full else []


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 1)


def _mb(v: float | int | None) -> float | None:
    return None if v is None else round(v / 2**20, 1)


def run_soak(
    sessions: int,
    minutes: float,
    out: Path | None = None,
    engine: str | None = None,
    server_url: str | None = None,
    server_pid: int | None = None,
    client_processes: int = 1,
    decode: bool = True,
) -> dict[str, Any]:
    """The soak (see the module docstring); prints a summary and writes JSON to `out`.
    With `server_url`, `server_pid` names that server's process for RSS / GPU samples;
    `client_processes` > 1 (with `server_url`) spreads the clients over that many processes.
    `decode=False`: the clients time frames without decoding them (`skip_video_decoding`)."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # aiortc's closing-task noise
    for name in ("aioice", "aiortc", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if client_processes > 1:
        if server_url is None:
            raise ValueError("client processes soak a running server: give its URL")
        result = asyncio.run(
            soak_with_client_processes(
                sessions, minutes, client_processes, server_url, server_pid, decode
            )
        )
    else:
        if not decode:
            skip_video_decoding()  # this process is only the soak's clients
        result = asyncio.run(soak(sessions, minutes, engine, server_url, server_pid))
        result["client_decodes_video"] = decode
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    summary = {k: v for k, v in result.items() if k not in ("per_session", "samples")}
    print(json.dumps(summary, indent=2))
    return result
