"""Latency and frame accounting: per session (GET /v1/sessions/{id}) and server-wide (/metrics).

Latency of an audio chunk: from its arrival on the websocket to the moment the first frame
whose features read it (the frame's horizon passes the chunk's first sample) is handed to the
video track. First-frame latency: an utterance's first audio byte to its frame 0.

Per-session figures are kept in bounded windows (no Prometheus labels per session, so the
metric cardinality does not grow with sessions).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)


class ServerMetrics:
    """The Prometheus series of one server (its own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._session_series(self.registry)
        self._frame_series(self.registry)
        self._worker_series(self.registry)
        self._host_series(self.registry)

    def _session_series(self, r: CollectorRegistry) -> None:
        """Sessions, their admission and the overload figures."""
        self.sessions_active = Gauge("lipstream_sessions_active", "Sessions open now", registry=r)
        self.engine_late_fraction = Gauge(
            "lipstream_engine_late_fraction",
            "Speaking frames of the last 10 s the engine made too late (server.session.overload)",
            registry=r,
        )
        self.device_sessions = Gauge(
            "lipstream_device_sessions", "Sessions open now, by device", ["device"], registry=r
        )
        self.device_late_fraction = Gauge(
            "lipstream_device_late_fraction",
            "Speaking frames of the last 10 s made too late, by device",
            ["device"],
            registry=r,
        )
        self.device_failed = Gauge(
            "lipstream_device_failed",
            "1 where the device faulted (its sessions were ended; it takes no new ones)",
            ["device"],
            registry=r,
        )
        self.device_avatars = Gauge(
            "lipstream_device_avatars", "Avatars resident, by device", ["device"], registry=r
        )
        self.video_drop_fraction = Gauge(
            "lipstream_video_drop_fraction",
            "Video frames of the last 10 s dropped before the encoders (server.session.overload)",
            registry=r,
        )
        self.sessions_total = Counter("lipstream_sessions_total", "Sessions opened", registry=r)
        self.sessions_ended = Counter(
            "lipstream_sessions_ended_total", "Sessions ended, by reason", ["reason"], registry=r
        )
        self.sessions_refused = Counter(
            "lipstream_sessions_refused_total",
            "Session requests refused, by reason",
            ["reason"],
            registry=r,
        )
        self.auth_refused = Counter(
            "lipstream_auth_refused_total",
            "Requests refused for a missing or wrong API key",
            registry=r,
        )
        self.audio_refused = Counter(
            "lipstream_audio_refused_bytes_total",
            "Websocket audio dropped by the rate limit (bytes)",
            registry=r,
        )
        self.speech_backlog = Gauge(
            "lipstream_speech_backlog_seconds",
            "Speech received and not yet played, the largest over the sessions",
            registry=r,
        )

    def _frame_series(self, r: CollectorRegistry) -> None:
        """Frames handed to the tracks, dropped before the encoders, and their latency."""
        self.frames_sent = Counter(
            "lipstream_frames_sent_total",
            "Video frames handed to tracks, by kind",
            ["kind"],
            registry=r,
        )
        self.frames_dropped = Counter(
            "lipstream_frames_dropped_total",
            "Frames dropped before the encoder took them",
            registry=r,
        )
        self.late_frames = Counter(
            "lipstream_late_frames_total",
            "Ticks where the next speaking frame was not ready",
            registry=r,
        )
        self.audio_latency = Histogram(
            "lipstream_audio_to_frame_seconds",
            "Audio chunk arrival -> first frame using it handed to the track",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_frame_latency = Histogram(
            "lipstream_first_frame_seconds",
            "Utterance's first audio byte -> its first frame handed to the track",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def _worker_series(self, r: CollectorRegistry) -> None:
        """The frame worker: batches, steps, queue and turnaround."""
        self.frames_rendered = Counter(
            "lipstream_frames_rendered_total", "Frames the engine made", registry=r
        )
        self.worker_batch = Histogram(
            "lipstream_worker_batch_frames",
            "Frames per engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.worker_step = Histogram(
            "lipstream_worker_step_seconds",
            "Engine step time (features + render)",
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 1.0),
            registry=r,
        )
        self.worker_launch = Histogram(
            "lipstream_worker_launch_seconds",
            "Time the worker thread spends launching one step (GPU: enqueueing it; else: all of it)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 1.0),
            registry=r,
        )
        self.worker_launch_phase = Counter(
            "lipstream_worker_launch_phase_seconds",
            "GPU pipeline: host seconds launching steps, by phase (slot_wait: waiting for a "
            "free pinned-buffer slot; features, unet_vae, paste: enqueueing each stage)",
            ["phase"],
            registry=r,
        )
        self.worker_queued = Gauge(
            "lipstream_worker_queued_frames", "Frames waiting for the engine", registry=r
        )
        self.worker_turnaround = Gauge(
            "lipstream_worker_turnaround_seconds",
            "Frames handed to the worker -> back on the event loop, all sessions, last 5 s, at "
            "lead_quantile: what a new utterance's lead covers (0 without samples or when off)",
            registry=r,
        )

    def _host_series(self, r: CollectorRegistry) -> None:
        """Avatars and uploads, and the stalls of this process (server.ops.stall_watch; the
        soak reads these)."""
        self.avatars = Gauge(
            "lipstream_avatars", "Avatars on disk, by status", ["status"], registry=r
        )
        self.uploads_refused = Counter(
            "lipstream_uploads_refused_total",
            "Avatar uploads refused, by reason",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "lipstream_event_loop_lag_seconds",
            "How late the event loop woke a 20 ms timer (its lag for every callback then)",
            buckets=_STALL_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "lipstream_gc_pause_seconds",
            "Cyclic garbage-collector pauses, by generation",
            ["generation"],
            buckets=_STALL_BUCKETS,
            registry=r,
        )
        self.malloc_trim = Histogram(
            "lipstream_malloc_trim_seconds",
            "malloc_trim calls of the trimmer thread (arena locks held meanwhile)",
            buckets=_STALL_BUCKETS,
            registry=r,
        )


def percentile(values: deque[float] | list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


FIRST_PARTS = ("audio", "made", "wait")


@dataclass
class SessionStats:
    """One session's counters; `snapshot()` is what GET /v1/sessions/{id} shows."""

    window: int = 2000
    frames_sent: int = 0
    speech_frames: int = 0
    idle_frames: int = 0
    held_frames: int = 0
    engine_late_frames: int = 0  # ticks whose frame the engine had and had not made in time
    frames_dropped: int = 0
    audio_dropped: int = 0  # 20 ms audio frames dropped (each one shifts sync by 20 ms)
    late_starts: int = 0
    utterances: int = 0
    interrupted: int = 0
    audio_bytes: int = 0
    audio_refused_bytes: int = 0  # dropped by the audio rate limit
    latencies: deque[float] = field(default_factory=deque)
    first_frame: deque[float] = field(default_factory=deque)
    # each first frame's (audio, made, wait) seconds (server.session.playout.Tick.first_parts)
    first_parts: deque[tuple[float, float, float]] = field(default_factory=deque)
    _tick_times: deque[float] = field(default_factory=lambda: deque(maxlen=51))

    def tick(self, kind: str, now: float | None = None, engine_late: bool = False) -> None:
        self.frames_sent += 1
        self.engine_late_frames += engine_late
        if kind == "speech":
            self.speech_frames += 1
        elif kind == "hold":
            self.held_frames += 1
        else:
            self.idle_frames += 1
        self._tick_times.append(time.monotonic() if now is None else now)

    def latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        while len(self.latencies) > self.window:
            self.latencies.popleft()

    def first(self, seconds: float, parts: tuple[float, float, float] | None = None) -> None:
        self.first_frame.append(seconds)
        while len(self.first_frame) > self.window:
            self.first_frame.popleft()
        if parts is not None:
            self.first_parts.append(parts)
            while len(self.first_parts) > self.window:
                self.first_parts.popleft()

    @property
    def fps(self) -> float | None:
        """Frames handed to the track per second over the last 2 s."""
        t = self._tick_times
        if len(t) < 2 or t[-1] <= t[0]:
            return None
        return (len(t) - 1) / (t[-1] - t[0])

    def snapshot(self) -> dict[str, object]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 1)

        return {
            "frames_sent": self.frames_sent,
            "speech_frames": self.speech_frames,
            "idle_frames": self.idle_frames,
            "held_frames": self.held_frames,
            "engine_late_frames": self.engine_late_frames,
            "frames_dropped": self.frames_dropped,
            "audio_dropped": self.audio_dropped,
            "late_starts": self.late_starts,
            "utterances": self.utterances,
            "interrupted": self.interrupted,
            "audio_bytes": self.audio_bytes,
            "audio_refused_bytes": self.audio_refused_bytes,
            "fps": None if self.fps is None else round(self.fps, 2),
            "latency_ms": {
                "p50": ms(percentile(self.latencies, 50)),
                "p99": ms(percentile(self.latencies, 99)),
                "n": len(self.latencies),
            },
            "first_frame_ms": {
                "p50": ms(percentile(self.first_frame, 50)),
                "p99": ms(percentile(self.first_frame, 99)),
                "n": len(self.first_frame),
            },
            # where the first frames' time goes, the median of each part: the audio until
            # frame 0 can be made (its lookahead), the engine's turnaround, the wait to the tick
            "first_frame_parts_ms": {
                **{
                    name: ms(percentile([p[k] for p in self.first_parts], 50))
                    for k, name in enumerate(FIRST_PARTS)
                },
                "n": len(self.first_parts),
            },
        }
