"""Streaming sessions simulated against a real scheduler, and what a viewer would see.

`simulate` runs N sessions, each pushing speech in 20 ms chunks at real-time pace through a
`GpuScheduler` (no network), and measures what comes back: delivered fps, frame intervals,
first-frame latency, frames late for their playout slot and ticks the player holds, batch
sizes, host time per launch, GPU memory, CPU use. The streaming bench runs it on the GPU
pipeline; `bench.modelled_gpu` on a modelled GPU; the tests on the CPU.

The streaming bar for one point (`meets_streaming_bar`): every frame delivered, every
session at >= 24.5 fps, p99 frame interval <= 60 ms. `holds_realtime` asks more: no frame
late with one frame of playout lead.
"""

from __future__ import annotations

import math
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.options import CHUNK, PHASE_SPREAD_S
from engines.base import FPS, SAMPLE_RATE, FrameJob

MAX_LEAD_FRAMES = 3
MIN_FPS = 24.5  # a session below this is not real time
MAX_INTERVAL_P99_MS = 60.0  # the streaming bar's p99 frame interval


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: a buzzy carrier in syllable-shaped bursts, float32 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    carrier = np.sign(np.sin(2 * np.pi * 130 * t)) * 0.3 + 0.05 * rng.standard_normal(t.size)
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    return (carrier * env).astype(np.float32)


def pct(xs: list[float], q: float) -> float | None:
    """The `q`th percentile of `xs` (nearest rank; None when empty)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


@dataclass
class _Session:
    key: str
    audio: np.ndarray
    stream: Any  # engines.stream.SpeechStream
    first_audio: float = 0.0
    delivered: list[float] = field(default_factory=list)  # each frame's arrival
    errors: int = 0


@dataclass
class _Item:
    """A work item as the scheduler takes it (the fields of `server.session.worker.WorkItem`
    it reads)."""

    key: str
    avatar_id: str
    audio: np.ndarray
    jobs: list[FrameJob]
    deadline: float
    done: Any
    seq: int = 0


class _Receiver:
    """The sessions' side of the scheduler: notes each frame's arrival."""

    def __init__(self, sessions: list[_Session]) -> None:
        self.by_key = {s.key: s for s in sessions}
        self.lock = threading.Lock()

    def done(self, item: _Item, frames: list[Any] | None, exc: BaseException | None) -> None:
        now = time.perf_counter()
        s = self.by_key[item.key]
        with self.lock:
            if exc is not None or frames is None:
                s.errors += len(item.jobs)
                return
            s.delivered.extend([now] * len(frames))

    def wait_for(self, frames: int, timeout_s: float = 5.0) -> None:
        """Until `frames` have come back (or failed), at most `timeout_s`."""
        end = time.perf_counter() + timeout_s
        while time.perf_counter() < end:
            with self.lock:
                got = sum(len(s.delivered) + s.errors for s in self.by_key.values())
            if got >= frames:
                return
            time.sleep(0.01)


@dataclass
class _Usage:
    """What the machine had used when a run started (compared at its end)."""

    torch: Any
    steps: int
    phases: dict[str, float]
    cpu: Any
    mem: int
    started: float

    @classmethod
    def now(cls, sched: Any, torch: Any) -> _Usage:
        cuda = torch is not None and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return cls(
            torch if cuda else None,
            sched.steps,
            launch_totals(sched),
            resource.getrusage(resource.RUSAGE_SELF),
            torch.cuda.memory_allocated() if cuda else 0,
            time.perf_counter(),
        )


def simulate(
    sched: Any,
    avatar_id: str,
    n: int,
    seconds: float,
    torch: Any,
    phase_spread_s: float = PHASE_SPREAD_S,
) -> dict[str, Any]:
    """N sessions each pushing `seconds` of speech in 20 ms chunks at real-time pace through
    `sched`; frames are "played" at 25 fps from the first one's arrival. Session k starts
    k * `phase_spread_s` / n after the first (default: all within one 20 ms chunk; 0.04 spreads
    their frames' phases over a whole frame period, as sessions opened at random times are).
    `torch`: the module, for GPU memory figures (None: none)."""
    from engines.stream import SpeechStream

    sessions = [
        _Session(f"s{k}", speech(seconds + 1, seed=k), SpeechStream(max_utterance_s=seconds + 5))
        for k in range(n)
    ]
    receiver = _Receiver(sessions)
    before = _Usage.now(sched, torch)
    _push_speech(sched, avatar_id, sessions, seconds, phase_spread_s, receiver, before.started)
    expect = sum(s.stream.ready_frames for s in sessions)
    receiver.wait_for(expect)  # the stragglers
    res: dict[str, Any] = {
        "sessions": n,
        "seconds": seconds,
        "frames_expected": expect,
        "frames_delivered": sum(len(s.delivered) for s in sessions),
        "errors": sum(s.errors for s in sessions),
        **_delivery_figures(sessions),
        **_step_figures(sched, before),
        **_usage_figures(before, n),
    }
    res["holds_realtime"] = meets_streaming_bar(res) and res["late_frames_by_lead"][1] == 0
    return res


def _push_speech(
    sched: Any,
    avatar_id: str,
    sessions: list[_Session],
    seconds: float,
    phase_spread_s: float,
    receiver: _Receiver,
    t_start: float,
) -> None:
    """Every session's chunks in time order (session k's chunk c at c x 20 ms + k x spread
    / n after `t_start`), each frame that becomes ready submitted as a work item."""
    n = len(sessions)
    chunks = int(seconds * SAMPLE_RATE) // CHUNK
    pushes = sorted(
        (c * CHUNK / SAMPLE_RATE + k * phase_spread_s / n, c, k)
        for c in range(chunks)
        for k in range(n)
    )
    for at, c, k in pushes:
        s = sessions[k]
        wait = t_start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        if c == 0:
            s.first_audio = time.perf_counter()
        s.stream.push(s.audio[c * CHUNK : (c + 1) * CHUNK])
        jobs = s.stream.take()
        if jobs:  # a view of the pushed audio (the featurizer reads audio[:horizon] only)
            due = s.first_audio + 0.12 + jobs[0].index / FPS
            audio = s.audio[: s.stream.n_samples]
            sched.submit(_Item(s.key, avatar_id, audio, jobs, due, receiver.done))


def _delivery_figures(sessions: list[_Session]) -> dict[str, Any]:
    """Rates, intervals, first-frame latency and playout lateness of the frames delivered."""
    intervals_ms: list[float] = []
    first: list[float] = []
    fps: list[float] = []
    late_by_lead = [0] * (MAX_LEAD_FRAMES + 1)
    held_by_lead = [0] * (MAX_LEAD_FRAMES + 1)
    lateness_ms: list[float] = []
    for s in sessions:
        d = s.delivered
        if not d:
            continue
        first.append((d[0] - s.first_audio) * 1e3)
        behind = playout_lateness_ms(d)
        lateness_ms.extend(behind)
        for lead in range(MAX_LEAD_FRAMES + 1):
            late_by_lead[lead] += sum(1 for x in behind if x > lead * 1e3 / FPS + 1.0)
            held_by_lead[lead] += playout_holds(d, lead)
        intervals_ms.extend((1e3 * np.diff(d)).tolist())
        fps.append((len(d) - 1) / (d[-1] - d[0]) if len(d) > 1 else 0.0)
    return {
        "delivered_fps_min": min(fps) if fps else 0.0,
        "delivered_fps_mean": statistics.mean(fps) if fps else 0.0,
        "frame_interval_ms_p50": pct(intervals_ms, 50),
        "frame_interval_ms_p99": pct(intervals_ms, 99) or 0.0,
        "first_frame_ms_p50": pct(first, 50),
        "first_frame_ms_p99": pct(first, 99),
        "first_frame_ms_max": max(first) if first else None,
        # playout from the first frame's arrival, 25 fps: frames arriving after their slot
        # with 0, 1, 2, 3 frames (0-120 ms) of playout lead (the server's start_lead_frames
        # adapts to the step time), and how far behind its slot a frame arrived
        "late_frames_no_buffer": late_by_lead[0],
        "late_frames_40ms_buffer": late_by_lead[1],
        "late_frames_by_lead": late_by_lead,
        # what the server's player shows instead: a frame not there at its tick repeats the
        # last one (a held tick) and the frames after it play one tick later, so one late
        # start costs one hold, not every frame after it
        "held_frames_by_lead": held_by_lead,
        "frame_lateness_ms_p99": pct(lateness_ms, 99),
        "frame_lateness_ms_max": max(lateness_ms) if lateness_ms else None,
    }


def _step_figures(sched: Any, before: _Usage) -> dict[str, Any]:
    """The scheduler's steps since `before`: batch sizes and host time per launch."""
    steps = sched.steps - before.steps
    hist = list(sched.history)[-steps:] if steps > 0 else []
    return {
        "batch_mean": statistics.mean([h.frames for h in hist]) if hist else 0,
        "batch_max": max([h.frames for h in hist]) if hist else 0,
        "steps": steps,
        # host time enqueueing a step, and (GPU pipeline) by phase: what the worker thread
        # spends per step whatever the GPU does
        "launch_ms_mean": 1e3 * statistics.mean([h.launch_s for h in hist]) if hist else None,
        "launch_phase_ms_mean": phase_means(sched, before.phases, steps),
    }


def _usage_figures(before: _Usage, sessions: int) -> dict[str, Any]:
    """GPU memory and CPU cores used since `before`."""
    wall = time.perf_counter() - before.started
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    torch = before.torch
    mem_peak = torch.cuda.max_memory_allocated() - before.mem if torch is not None else 0
    used = (cpu.ru_utime + cpu.ru_stime) - (before.cpu.ru_utime + before.cpu.ru_stime)
    return {
        "gpu_mem_peak_over_idle_MiB": mem_peak / 2**20,
        "gpu_mem_per_session_MiB": mem_peak / 2**20 / sessions,
        "cpu_cores_used": used / wall,
    }


def _every_frame_at_rate(run: dict[str, Any]) -> bool:
    """Every frame of the point delivered, every session at >= MIN_FPS."""
    return bool(
        run["frames_delivered"] == run["frames_expected"] and run["delivered_fps_min"] >= MIN_FPS
    )


def meets_streaming_bar(run: dict[str, Any]) -> bool:
    """Whether one point meets the streaming bar: every frame delivered (none dropped), every
    session at >= 24.5 fps, p99 frame interval <= 60 ms (late frames aside)."""
    p99 = run["frame_interval_ms_p99"] or 0.0
    return _every_frame_at_rate(run) and p99 <= MAX_INTERVAL_P99_MS


def max_sessions_streaming_bar(runs: dict[str, Any]) -> int:
    """The most sessions of `runs` (the streaming section's {"N": result}) meeting the
    streaming bar (0 if none did)."""
    ok = [int(k) for k, v in runs.items() if k.isdigit() and meets_streaming_bar(v)]
    return max(ok) if ok else 0


def max_sessions_by_lead(runs: dict[str, Any], key: str = "late_frames_by_lead") -> list[int]:
    """For a playout lead of 0..MAX_LEAD_FRAMES frames: the most sessions of `runs` (the
    streaming section's {"N": result}) that got every frame at >= 24.5 fps with none late
    (what a viewer sees with the server's `start_lead_frames` at that lead; 0 if none did).
    `key="held_frames_by_lead"`: with no held tick instead (the server's player)."""
    out = []
    for lead in range(MAX_LEAD_FRAMES + 1):
        ok = [
            int(k)
            for k, v in runs.items()
            if k.isdigit()
            and _every_frame_at_rate(v)
            and v.get(key, v["late_frames_by_lead"])[lead] == 0
        ]
        out.append(max(ok) if ok else 0)
    return out


def playout_holds(delivered: list[float], lead: int = 0) -> int:
    """Ticks a viewer sees held (the last frame repeated) when frames arriving at `delivered`
    are played as the server's player plays them: frame 0 at its arrival + `lead` ticks, each
    next one a tick later, and a frame not there at its tick holds the picture until the tick
    after it arrives, every later frame moving with it (`server.session.playout.Playout.tick`)."""
    if not delivered:
        return 0
    held = 0
    slot = delivered[0] + lead / FPS
    for t in delivered:
        if t > slot + 1e-3:  # within a millisecond is on time, as in late_frames_by_lead
            late_ticks = math.ceil((t - slot) * FPS)
            held += late_ticks
            slot += late_ticks / FPS
        slot += 1.0 / FPS
    return held


def playout_lateness_ms(delivered: list[float]) -> list[float]:
    """Per frame, how far (ms, >= 0) after its playout slot it arrived: frame i's slot is
    delivered[0] + i / 25 s (playout from the first frame's arrival at 25 fps)."""
    if not delivered:
        return []
    t0 = delivered[0]
    return [max(0.0, (t - t0 - i / FPS) * 1e3) for i, t in enumerate(delivered)]


def launch_totals(sched: Any) -> dict[str, float]:
    """A copy of the GPU pipeline's host seconds per launch phase so far ({} without one)."""
    return dict(getattr(getattr(sched, "pipeline", None), "launch_s", None) or {})


def phase_means(sched: Any, before: dict[str, float], steps: int) -> dict[str, float] | None:
    """Mean ms per step of each launch phase since `before` (None without a GPU pipeline)."""
    now = launch_totals(sched)
    if not now or not steps:
        return None
    return {k: round(1e3 * (v - before.get(k, 0.0)) / steps, 3) for k, v in now.items()}


def latency_runs(sched: Any, avatar_id: str, utterances: int) -> dict[str, Any]:
    """First-frame latency of one session, `utterances` times (1 s of speech each, real time,
    from an idle GPU): first audio chunk pushed -> first frame handed back."""
    lat = []
    for _ in range(utterances):
        r = simulate(sched, avatar_id, 1, 1.0, None)
        if r["first_frame_ms_p50"] is not None:
            lat.append(r["first_frame_ms_p50"])
        time.sleep(0.1)
    return {
        "utterances": len(lat),
        "first_frame_ms_p50": pct(lat, 50),
        "first_frame_ms_p99": pct(lat, 99),
        "all_ms": lat,
    }
