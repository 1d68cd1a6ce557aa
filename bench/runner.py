"""`lipstream bench`: throughput and streaming latency on this machine, JSON out.

Sections (each in the JSON, progress on stderr, a short table last):
- `reference`: MuseTalk's realtime way, the baseline (eager fp16, batch 20, PIL paste-back
  on the CPU, one thread) on a 10 s clip, features included;
- `offline`: UNet+VAE fps per backend (torch eager, compiled) and batch size;
- `accuracy`: compiled vs eager (and both vs an fp32 reference) in uint8 levels;
- `pipeline`: the full GPU path for the 10 s clip (audio encoder + UNet + VAE + GPU
  paste-back into the avatar frames + I420 + pinned host copy), per backend;
- `render`: `lipstream render`'s path (mp4 written) with the torch engine and with the GPU path;
- `streaming`: N sessions pushing speech in real time (20 ms chunks) through the real
  `GpuScheduler` (no network): delivered fps, frame interval p50/p99, first-frame latency
  p50/p99, late frames, GPU memory, CPU use; `--sessions` sweeps N;
- `encoders`: aiortc's VP8 / H.264 encoders at the avatar size: CPU cores per session.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import FPS, SAMPLE_RATE, check_buckets, frames_in
from engines.pipeline.scheduler import GATHER_S

log = logging.getLogger(__name__)

CHUNK = 320  # 20 ms of audio per push, as a browser / TTS sends it
# the streaming sessions' start spread: session k of n starts k x this / n after the first.
# One 20 ms chunk (every run so far); 0.04 spreads their frames' phases over a whole frame
PHASE_SPREAD_S = CHUNK / SAMPLE_RATE


SECTIONS = (  # in the order they run
    "reference",
    "offline",
    "accuracy",
    "pipeline",
    "render",
    "streaming",
    "encoders",
)


@dataclass(frozen=True)
class BenchOptions:
    models_dir: str | None = None  # None: random full-size weights in a temp dir
    sessions: tuple[int, ...] = (1, 8, 16, 20, 24)
    long_sessions: int = 20  # the N run for `long_s` seconds
    long_s: float = 60.0
    sweep_s: float = 12.0
    gather_s: float = GATHER_S  # streaming: SchedulerOptions.gather_s of the simulated scheduler
    phase_spread_s: float = PHASE_SPREAD_S  # streaming: the sessions' start spread
    clip_s: float = 10.0
    height: int = 720
    width: int = 1280
    avatar_frames: int = 25
    backends: tuple[str, ...] = ("torch", "compiled")  # variant names (variant_options)
    stream_backends: tuple[str, ...] = ("compiled",)  # the first gets the long run too
    batches: tuple[int, ...] = (1, 4, 8, 16, 20, 32, 48)
    buckets: tuple[int, ...] = (2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48)
    sections: tuple[str, ...] = SECTIONS
    rounds: int = 5  # offline pipeline: interleaved timed rounds per variant

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.sessions) or self.long_s < 0 or self.sweep_s <= 0:
            raise ValueError("sessions must be >= 1 and durations positive")
        if self.rounds < 1 or self.clip_s <= 0:
            raise ValueError("rounds must be >= 1 and clip_s positive")
        check_buckets(self.buckets)
        if self.gather_s < 0:
            raise ValueError(f"gather_s must be >= 0, got {self.gather_s}")
        if not 0 <= self.phase_spread_s <= 1:
            raise ValueError(f"phase_spread_s must be in [0, 1] s, got {self.phase_spread_s}")
        unknown = {b.split("-")[0] for b in (*self.backends, *self.stream_backends)} - {
            "torch",
            "compiled",
            "tensorrt",
        }
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}")
        for name in (*self.backends, *(split_gather(n)[0] for n in self.stream_backends)):
            variant_fields(name)  # a flag that names no switch fails here, before measuring
        bad = set(self.sections) - set(SECTIONS)
        if bad:
            raise ValueError(f"unknown sections {sorted(bad)}")


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: a buzzy carrier in syllable-shaped bursts, float32 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    carrier = np.sign(np.sin(2 * np.pi * 130 * t)) * 0.3 + 0.05 * rng.standard_normal(t.size)
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    return (carrier * env).astype(np.float32)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


class Bench:
    def __init__(self, options: BenchOptions, out_path: Path) -> None:
        import torch

        self.torch = torch
        self.o = options
        self.out_path = out_path
        self.res: dict[str, Any] = {
            "options": options.__dict__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.dev = torch.device("cuda")
        self._tmp = tempfile.TemporaryDirectory(prefix="lipstream-bench-")

    # -- plumbing ----------------------------------------------------------------------
    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(self.res, indent=1, default=str))

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        import traceback

        if name not in self.o.sections:
            return None
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            log.exception("bench section failed: %s", name)
            out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        if isinstance(out, dict):
            out["section_s"] = round(time.perf_counter() - t0, 1)
        self.res[name] = out
        self.save()
        print(
            f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True
        )
        return out

    # -- set-up ------------------------------------------------------------------------
    def setup(self) -> None:
        from bench.gpu import measure
        from engines.musetalk.engine import MuseTalkEngine
        from engines.musetalk.weights import make_random

        torch = self.torch
        info: dict[str, Any] = {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        }
        root = self.o.models_dir
        if root is None:
            root = str(Path(self._tmp.name) / "models")
            t0 = time.perf_counter()
            make_random(root, size="full", seed=0)
            info["make_random_s"] = time.perf_counter() - t0
            info["weights"] = "random, full size"
        t0 = time.perf_counter()
        mem0 = torch.cuda.memory_allocated()
        self.engine = MuseTalkEngine(root, device="cuda", batch_size=20)
        info["engine_load_s"] = time.perf_counter() - t0
        info["gpu_mem_models_GiB"] = (torch.cuda.memory_allocated() - mem0) / 2**30
        self.avatar = measure.synthetic_avatar(self.o.avatar_frames, self.o.height, self.o.width)
        self.avatar.latents = None  # let the engine encode them with its VAE
        mem1 = torch.cuda.memory_allocated()
        self.engine.load_avatar(self.avatar)
        from engines.pipeline import paste

        # as the server's pipeline keeps it (I420 output: no RGB frames)
        gav = paste.upload_avatar(self.avatar, self.dev, keep_frames=False)
        info["gpu_mem_per_avatar_MiB"] = (torch.cuda.memory_allocated() - mem1) / 2**20
        info["gpu_mem_per_avatar_frame_MiB"] = info["gpu_mem_per_avatar_MiB"] / self.avatar.n_frames
        info["avatar"] = {
            "frames": self.avatar.n_frames,
            "size": self.avatar.size,
            "paste_region": gav.region,
        }
        del gav
        self.clip = speech(self.o.clip_s)
        self.res["setup"] = info
        self.pipelines: dict[str, Any] = {}
        self.save()

    def pipeline(self, name: str) -> Any:
        """The pipeline for a variant name (`variant_options`): `torch`, `compiled`,
        `compiled-nofold` (plain VAE upsampling), `compiled-eagerenc` (eager whisper),
        `compiled-stocknorm` (torch's own GroupNorm), ..."""
        from engines.backends import build_pipeline

        if name not in self.pipelines:
            # dynamo keys its compiled code by the forward's code object and guards on the
            # module's structure, not its identity: without a reset a second variant of the
            # same code (e.g. `compiled-stocknorm` after `compiled`) silently reuses the first's
            # kernels. Built pipelines replay their own CUDA graphs and are unaffected.
            self.torch._dynamo.reset()
            p = build_pipeline(self.engine, variant_options(name, self.o.buckets), warm_up=False)
            t0 = time.perf_counter()
            warm = p.warm_up()
            self.res.setdefault("warmup", {})[name] = {
                "total_s": time.perf_counter() - t0,
                "per_bucket_s": warm,
            }
            self.pipelines[name] = p
        return self.pipelines[name]

    # -- sections ----------------------------------------------------------------------
    def reference(self) -> dict[str, Any]:
        """MuseTalk's realtime script: features, eager fp16 UNet+VAE in batches of 20, faces
        to the CPU, PIL paste-back per frame (one thread)."""
        from bench.gpu.measure import pil_paste_back
        from engines.musetalk.unet_step import unet_forward
        from engines.musetalk.vae import decode_latents

        torch, eng, av = self.torch, self.engine, self.avatar
        res = eng._resident(av.id)

        def run() -> tuple[float, float]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            feats = eng.offline_features(self.clip)
            n = len(feats)
            gpu_s = 0.0
            for s in range(0, n, 20):
                idx = [av.loop_frame(i) for i in range(s, min(n, s + 20))]
                g0 = time.perf_counter()
                with torch.no_grad():
                    pred = unet_forward(eng.unet, res.latents[idx], feats[s : s + len(idx)])
                    faces = decode_latents(eng.vae, pred)
                gpu_s += time.perf_counter() - g0
                for k, i in enumerate(idx):
                    pil_paste_back(
                        av.frames[i], faces[k], av.face_boxes[i], av.crop_boxes[i], av.masks[i]
                    )
            return n / (time.perf_counter() - t0), n / gpu_s

        run()  # warm-up
        fps, gpu_fps = run()
        return {"fps": fps, "unet_vae_fps_batch20": gpu_fps, "frames": frames_in(self.clip.size)}

    def offline(self) -> dict[str, Any]:
        from bench.gpu import measure

        torch = self.torch
        out: dict[str, Any] = {}
        for backend in self.o.backends:
            if backend == "tensorrt":
                out[backend] = {"error": self._trt_reason()}
                continue
            p = self.pipeline(backend)
            rows = {}
            for b in self.o.batches:
                lat = torch.randn((b, 8, 32, 32), device=self.dev, dtype=torch.float16)
                aud = torch.randn((b, 50, 384), device=self.dev, dtype=torch.float16)
                with torch.inference_mode():
                    t = measure.gpu_time_ms(
                        lambda p=p, lat=lat, aud=aud: p.step(lat, aud),  # type: ignore[misc]
                        reps=10,
                        warmup=2,
                    )
                rows[str(b)] = {"ms": t["median_ms"], "fps": b * 1e3 / t["median_ms"]}
            out[backend] = rows
        return out

    def accuracy(self) -> dict[str, Any]:
        import copy

        from engines.pipeline.compiled import MuseTalkStep

        torch = self.torch
        p = self.pipeline("compiled")
        eager = self.pipeline("torch").step
        ref32 = MuseTalkStep(
            copy.deepcopy(self.engine.unet).float(), copy.deepcopy(self.engine.vae).float()
        ).to(self.dev)
        g = torch.Generator(device=self.dev).manual_seed(5)
        diffs: dict[str, list[float]] = {
            "compiled_vs_eager": [],
            "eager_vs_fp32": [],
            "compiled_vs_fp32": [],
        }
        # the other compiled variants asked for (`--backends compiled,compiled-nhwcnorm`)
        extra = {
            name: self.pipeline(name).step
            for name in self.o.backends
            if name.startswith("compiled-")
        }
        for name in extra:
            diffs[f"{name}_vs_eager"] = []
            diffs[f"{name}_vs_fp32"] = []
        stats: dict[str, Any] = {}
        with torch.inference_mode():
            for b in (1, 5, 16):
                lat = torch.randn((b, 8, 32, 32), device=self.dev, generator=g)
                aud = torch.randn((b, 50, 384), device=self.dev, generator=g)
                c = p.step(lat.half(), aud.half()).int()
                e = eager(lat.half(), aud.half()).int()
                r = ref32(lat, aud).int()
                pairs = [
                    ("compiled_vs_eager", c - e),
                    ("eager_vs_fp32", e - r),
                    ("compiled_vs_fp32", c - r),
                ]
                for vname, vstep in extra.items():
                    v = vstep(lat.half(), aud.half()).int()
                    pairs += [(f"{vname}_vs_eager", v - e), (f"{vname}_vs_fp32", v - r)]
                for name, d in pairs:
                    d = d.abs()
                    diffs[name].append(float(d.max()))
                    s = stats.setdefault(name, {"pixels": 0, "over2": 0, "over1": 0, "sum": 0.0})
                    s["pixels"] += d.numel()
                    s["over2"] += int((d > 2).sum())
                    s["over1"] += int((d > 1).sum())
                    s["sum"] += float(d.float().sum())
        del ref32
        torch.cuda.empty_cache()
        return {
            name: {
                "max": max(diffs[name]),
                "mean": s["sum"] / s["pixels"],
                "fraction_over_1": s["over1"] / s["pixels"],
                "fraction_over_2": s["over2"] / s["pixels"],
            }
            for name, s in stats.items()
        }

    def full_pipeline(self) -> dict[str, Any]:
        """Offline fps per variant, timed in interleaved rounds (A B C A B C ...) so that
        clock and thermal drift over the run falls on all of them alike; each variant's fps
        is the median of its rounds. After each variant is built (compiled) one round runs
        over every variant built so far, and the figures are saved: a run cut short during a
        later compile keeps comparable figures for the earlier variants."""
        torch = self.torch
        n = frames_in(self.clip.size)
        names = [b for b in self.o.backends if b != "tensorrt"]

        def run(p: Any) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            feats = self.engine.offline_features(self.clip)
            frames = p.render(self.avatar.id, list(range(n)), feats)
            assert len(frames) == n
            return n / (time.perf_counter() - t0)

        def result() -> dict[str, Any]:
            return {
                name: {"fps": statistics.median(r), "fps_rounds": r, "frames": n}
                for name, r in runs.items()
            }

        runs: dict[str, list[float]] = {}
        for name in names:
            run(self.pipeline(name))  # untimed: lazy set-up, the avatar's buffers
            runs[name] = []
            for built in runs:
                runs[built].append(run(self.pipeline(built)))
            self.res["pipeline"] = {**result(), "partial": True}
            self.save()
        for _ in range(self.o.rounds - 1):
            for name in names:
                runs[name].append(run(self.pipeline(name)))
        return result()

    def render(self) -> dict[str, Any]:
        from engines.render.offline import RenderOptions, render_to_files
        from engines.render.video_io import Mp4Writer

        torch = self.torch
        out: dict[str, Any] = {}
        mp4 = Path(self._tmp.name) / "clip.mp4"
        r = render_to_files(
            self.engine,
            self.avatar,
            self.clip,
            mp4,
            options=RenderOptions(batch_size=20, progress=False),
        )
        out["torch_engine_cpu_paste"] = {"fps": r.fps, "encoder": r.encoder}
        n = frames_in(self.clip.size)
        from engines.backends import build_pipeline
        from engines.pipeline.gpu import PipelineOptions

        options = PipelineOptions(backend="compiled", buckets=self.o.buckets, output="rgb")
        p = build_pipeline(self.engine, options, warm_up=False)
        p.step = self.pipeline("compiled").step  # share the captured graphs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = self.engine.offline_features(self.clip)
        writer = Mp4Writer(mp4, *self.avatar.size, self.clip)
        try:
            for s in range(0, n, 48):
                writer.write_batch(
                    np.stack(
                        p.render(self.avatar.id, list(range(s, min(n, s + 48))), feats[s : s + 48])
                    )
                )
        finally:
            writer.close()
        out["compiled_gpu_paste"] = {
            "fps": n / (time.perf_counter() - t0),
            "encoder": writer.encoder,
        }
        return out

    def streaming(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, name in enumerate(self.o.stream_backends):
            out[name] = self._streaming(name, long_run=k == 0)
        return out

    def _streaming(self, name: str, long_run: bool) -> dict[str, Any]:
        from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions

        torch = self.torch
        base, gather_s = split_gather(name)
        p = self.pipeline(base)  # "compiled-gather20" streams through "compiled"'s pipeline
        # as the server's load_avatar does: one silent frame through every stage and the peak
        # batch, so the first utterance pays no lazy set-up (without it the H200 runs read
        # 206-257 ms for the first of ten utterances, 111 ms for the rest)
        p.prepare_avatar(self.avatar.id)
        opts = SchedulerOptions(
            max_batch=max(self.o.buckets),
            output="i420",
            gather_s=self.o.gather_s if gather_s is None else gather_s,
        )
        sched = GpuScheduler(self.engine, opts, pipeline=p)
        sched.start()
        out: dict[str, Any] = {}
        try:
            runs = stream_runs(self.o, long_run)
            out["latency_1_session"] = latency_runs(sched, self.avatar.id, 10)
            for n, secs in runs:
                print(
                    f"[bench] streaming {n} sessions for {secs:.0f}s", file=sys.stderr, flush=True
                )
                out[str(n)] = simulate(sched, self.avatar.id, n, secs, torch, self.o.phase_spread_s)
                self.res[f"{name}_partial"] = out
                self.save()
        finally:
            sched.stop()
        ok = [int(k) for k, v in out.items() if k.isdigit() and v["holds_realtime"]]
        out["max_sessions_realtime"] = max(ok) if ok else 0
        out["max_sessions_by_lead"] = max_sessions_by_lead(out)
        out["max_sessions_by_held_lead"] = max_sessions_by_lead(out, "held_frames_by_lead")
        out["max_sessions_issue_bar"] = max_sessions_issue_bar(out)
        return out

    def encoders(self) -> dict[str, Any]:
        from bench.gpu.measure import encoder_cost

        return encoder_cost(self.o.height, self.o.width, frames=40, threads=(1, 8, 16))

    def _trt_reason(self) -> str:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            return f"tensorrt not importable: {exc}"
        return "tensorrt importable (see `lipstream engines build`)"

    def run(self) -> dict[str, Any]:
        self.setup()
        self.section("reference", self.reference)
        self.section("offline", self.offline)
        self.section("accuracy", self.accuracy)
        self.section("pipeline", self.full_pipeline)
        self.section("render", self.render)
        self.section("streaming", self.streaming)
        self.section("encoders", self.encoders)
        self.res["gpu_mem_peak_GiB"] = self.torch.cuda.max_memory_allocated() / 2**30
        self.save()
        return self.res


@dataclass
class _Session:
    key: str
    audio: np.ndarray
    stream: Any
    first_audio: float = 0.0
    delivered: list[float] = field(default_factory=list)
    late: int = 0
    errors: int = 0
    utterance: int = 0


@dataclass
class _Item:
    key: str
    avatar_id: str
    audio: np.ndarray
    jobs: list
    deadline: float
    done: Any
    seq: int = 0


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
    their frames' phases over a whole frame period, as sessions opened at random times are)."""
    from engines.stream import SpeechStream

    lock = threading.Lock()
    sessions = [
        _Session(f"s{k}", speech(seconds + 1, seed=k), SpeechStream(max_utterance_s=seconds + 5))
        for k in range(n)
    ]

    def done(item: _Item, frames: list | None, exc: BaseException | None) -> None:
        now = time.perf_counter()
        s = by_key[item.key]
        with lock:
            if exc is not None or frames is None:
                s.errors += len(item.jobs)
                return
            s.delivered.extend([now] * len(frames))

    by_key = {s.key: s for s in sessions}
    cuda = torch is not None and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated() if cuda else 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    steps0 = sched.steps
    phases0 = _launch_totals(sched)
    t_start = time.perf_counter()
    chunks = int(seconds * SAMPLE_RATE) // CHUNK
    # every session's chunks in time order: session k's chunk c at c x 20 ms + k x spread / n
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
            sched.submit(_Item(s.key, avatar_id, s.audio[: s.stream.n_samples], jobs, due, done))
    # wait for the stragglers
    expect = sum(s.stream.ready_frames for s in sessions)
    t_end = time.perf_counter() + 5
    while time.perf_counter() < t_end:
        with lock:
            got = sum(len(s.delivered) + s.errors for s in sessions)
        if got >= expect:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - t_start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    mem_peak = torch.cuda.max_memory_allocated() - mem0 if cuda else 0
    intervals: list[float] = []
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
        intervals.extend(np.diff(d).tolist())
        fps.append((len(d) - 1) / (d[-1] - d[0]) if len(d) > 1 else 0.0)
    intervals_ms = [x * 1e3 for x in intervals]
    hist = list(sched.history)[-(sched.steps - steps0) :] if sched.steps > steps0 else []
    p99 = _pct(intervals_ms, 99) or 0.0
    res = {
        "sessions": n,
        "seconds": seconds,
        "frames_expected": expect,
        "frames_delivered": sum(len(s.delivered) for s in sessions),
        "errors": sum(s.errors for s in sessions),
        "delivered_fps_min": min(fps) if fps else 0.0,
        "delivered_fps_mean": statistics.mean(fps) if fps else 0.0,
        "frame_interval_ms_p50": _pct(intervals_ms, 50),
        "frame_interval_ms_p99": p99,
        "first_frame_ms_p50": _pct(first, 50),
        "first_frame_ms_p99": _pct(first, 99),
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
        "frame_lateness_ms_p99": _pct(lateness_ms, 99),
        "frame_lateness_ms_max": max(lateness_ms) if lateness_ms else None,
        "batch_mean": statistics.mean([h.frames for h in hist]) if hist else 0,
        "batch_max": max([h.frames for h in hist]) if hist else 0,
        "steps": sched.steps - steps0,
        # host time enqueueing a step, and (GPU pipeline) by phase: what the worker thread
        # spends per step whatever the GPU does
        "launch_ms_mean": 1e3 * statistics.mean([h.launch_s for h in hist]) if hist else None,
        "launch_phase_ms_mean": _phase_means(sched, phases0, sched.steps - steps0),
        "gpu_mem_peak_over_idle_MiB": mem_peak / 2**20,
        "gpu_mem_per_session_MiB": mem_peak / 2**20 / n,
        "cpu_cores_used": ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime))
        / wall,
    }
    res["holds_realtime"] = meets_issue_bar(res) and late_by_lead[1] == 0
    return res


MAX_LEAD_FRAMES = 3


def _every_frame_at_rate(run: dict[str, Any]) -> bool:
    """Every frame of the point delivered, every session at >= 24.5 fps."""
    return bool(
        run["frames_delivered"] == run["frames_expected"] and run["delivered_fps_min"] >= 24.5
    )


def meets_issue_bar(run: dict[str, Any]) -> bool:
    """The issue's streaming bar for one point: every frame delivered (none dropped), every
    session at >= 24.5 fps, p99 frame interval <= 60 ms. `holds_realtime` asks more: no frame
    late with one frame of playout lead."""
    return _every_frame_at_rate(run) and (run["frame_interval_ms_p99"] or 0.0) <= 60.0


def max_sessions_issue_bar(runs: dict[str, Any]) -> int:
    """The most sessions of `runs` (the streaming section's {"N": result}) meeting the bar."""
    ok = [int(k) for k, v in runs.items() if k.isdigit() and meets_issue_bar(v)]
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


def _launch_totals(sched: Any) -> dict[str, float]:
    """A copy of the GPU pipeline's host seconds per launch phase so far ({} without one)."""
    return dict(getattr(getattr(sched, "pipeline", None), "launch_s", None) or {})


def _phase_means(sched: Any, before: dict[str, float], steps: int) -> dict[str, float] | None:
    """Mean ms per step of each launch phase since `before` (None without a GPU pipeline)."""
    now = _launch_totals(sched)
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
        "first_frame_ms_p50": _pct(lat, 50),
        "first_frame_ms_p99": _pct(lat, 99),
        "all_ms": lat,
    }


def split_gather(name: str) -> tuple[str, float | None]:
    """A streaming variant's `-gather<ms>` flag (the scheduler's gather_s) split off its
    pipeline name: "compiled-gather20" -> ("compiled", 0.02); without one, (name, None)."""
    parts = name.split("-")
    flags = [f for f in parts[1:] if f.startswith("gather")]
    if not flags:
        return name, None
    ms = flags[-1][len("gather") :]
    if len(flags) > 1 or not ms.isdigit():
        raise ValueError(f"bad gather flag in {name!r}: want one -gather<ms>, e.g. -gather20")
    return "-".join(p for p in parts if not p.startswith("gather")), int(ms) / 1e3


def stream_runs(o: BenchOptions, long_run: bool) -> list[tuple[int, float]]:
    """(sessions, seconds) to simulate: each `o.sessions` for `o.sweep_s`; where `long_run`
    (the first backend) and `o.long_s > 0`, `o.long_sessions` for `o.long_s` instead."""
    long = long_run and o.long_s > 0
    runs = [(n, o.sweep_s) for n in o.sessions if not long or n != o.long_sessions]
    if long:
        runs.append((o.long_sessions, o.long_s))
    return runs


# a variant's flags: each sets one PipelineOptions field away from the server's default
VARIANT_FLAGS: dict[str, tuple[str, bool]] = {
    "nofold": ("fold_upsample", False),  # the VAE's own upsampling convolutions
    "eagerenc": ("compile_encoder", False),  # the whisper encoder eager
    "stocknorm": ("nhwc_norm", False),  # torch's own GroupNorm
    "nhwcnorm": ("nhwc_norm", True),  # channels-last GroupNorm (the default)
    "melgraph": ("log_mel_in_graph", True),  # the log-mel in the encoder's graph (the default)
    "eagermel": ("log_mel_in_graph", False),  # the log-mel as eager ops
}


def variant_fields(name: str) -> tuple[str, dict[str, Any]]:
    """A variant name `<backend>[-nofold][-eagerenc][-enc<batch>][-stocknorm|-nhwcnorm]
    [-melgraph|-eagermel]` -> (backend, the PipelineOptions fields its flags set); no flag
    keeps the server's default. An unknown flag is a ValueError naming the known ones."""
    backend, *flags = name.split("-")
    fields: dict[str, Any] = {}
    for flag in flags:
        if flag.startswith("enc") and flag[3:].isdigit():
            fields["encoder_batch"] = int(flag[3:])
        elif flag in VARIANT_FLAGS:
            key, value = VARIANT_FLAGS[flag]
            fields[key] = value
        else:
            known = ", ".join([*VARIANT_FLAGS, "enc<batch>"])
            raise ValueError(f"unknown bench variant {flag!r} in {name!r}: flags are {known}")
    return backend, fields


def variant_options(name: str, buckets: tuple[int, ...]) -> Any:
    """PipelineOptions for a variant name (`variant_fields`), I420 out, with `buckets`."""
    from engines.pipeline.gpu import PipelineOptions

    backend, fields = variant_fields(name)
    return PipelineOptions(backend=backend, buckets=buckets, output="i420", **fields)


def check_backends(options: BenchOptions) -> None:
    """Fail before any measuring where a backend asked for cannot run on this host (a
    compiled variant without Triton's compiler or headers, tensorrt without its wheels):
    otherwise the bench would fail minutes in, at that backend's first compile."""
    from engines.backends import select_backend

    wanted = dict.fromkeys(b.split("-")[0] for b in (*options.backends, *options.stream_backends))
    for name in wanted:
        select_backend(name)  # EngineError naming the reason


def run_bench(options: BenchOptions, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark; writes JSON to `out` (default bench/results/<gpu>_<date>.json)."""
    import torch

    from engines.base import EngineError

    if not torch.cuda.is_available():
        raise EngineError("`lipstream bench` measures the GPU path and needs a CUDA GPU")
    check_backends(options)
    if out is None:
        gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-")
        out = Path("bench/results") / f"bench_{gpu}_{time.strftime('%Y-%m-%d_%H%M')}.json"
    bench = Bench(options, out)
    res = bench.run()
    print_table(res, sys.stdout)
    return res


def print_table(res: dict[str, Any], fh: Any) -> None:
    ref = (res.get("reference") or {}).get("fps")
    rows: list[tuple[str, Any]] = [("gpu", (res.get("setup") or {}).get("gpu"))]
    rows.append(("musetalk-reference fps", ref))
    for k, v in (res.get("pipeline") or {}).items():
        if isinstance(v, dict) and "fps" in v:
            rows.append((f"full pipeline {k} fps", v["fps"]))
            if ref:
                rows.append((f"full pipeline {k} x reference", v["fps"] / ref))
    for k, v in (res.get("render") or {}).items():
        if isinstance(v, dict) and "fps" in v:
            rows.append((f"render {k} fps", v["fps"]))
    for k, v in (res.get("offline") or {}).items():
        if isinstance(v, dict):
            rows.append(
                (
                    f"offline {k}",
                    {
                        b: round(x["fps"])
                        for b, x in v.items()
                        if isinstance(x, dict) and "fps" in x
                    },
                )
            )
    acc = res.get("accuracy") or {}
    for k, v in acc.items():
        if isinstance(v, dict) and "max" in v:
            rows.append((f"accuracy {k} max/mean", (v["max"], round(v["mean"], 4))))
    for variant, st in (res.get("streaming") or {}).items():
        if not isinstance(st, dict):
            continue
        for k, v in st.items():
            if isinstance(v, dict) and "sessions" in v:
                keys = (
                    "delivered_fps_min",
                    "frame_interval_ms_p99",
                    "first_frame_ms_p50",
                    "first_frame_ms_p99",
                    "late_frames_by_lead",
                    "held_frames_by_lead",
                    "batch_mean",
                    "holds_realtime",
                )
                rows.append(
                    (
                        f"stream {variant} N={k}",
                        {x: (round(v[x], 1) if isinstance(v[x], float) else v[x]) for x in keys},
                    )
                )
        lat = st.get("latency_1_session") or {}
        rows.append(
            (
                f"stream {variant} 1-session first frame p50/p99",
                (lat.get("first_frame_ms_p50"), lat.get("first_frame_ms_p99")),
            )
        )
        rows.append((f"stream {variant} max sessions realtime", st.get("max_sessions_realtime")))
        rows.append(
            (f"stream {variant} max sessions, issue's bar", st.get("max_sessions_issue_bar"))
        )
    for k in ("VP8", "H264"):
        e = (res.get("encoders") or {}).get(k)
        if isinstance(e, dict):
            rows.append(
                (
                    f"aiortc {k} ms/frame, cores/session",
                    (round(e["ms_per_frame_1_thread"], 2), round(e["cores_per_25fps_session"], 3)),
                )
            )
            srv = e.get("server") or {}
            if srv:
                rows.append(
                    (
                        f"server's {k} ms/frame, cores/session",
                        (
                            round(srv["ms_per_frame_1_thread"], 2),
                            round(srv["cores_per_25fps_session"], 3),
                        ),
                    )
                )
    for name, val in rows:
        with contextlib.suppress(Exception):
            val = round(val, 2) if isinstance(val, float) else val
        print(f"{name:40s} {val}", file=fh)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sessions", default="1,8,16,20,24")
    ap.add_argument("--long-s", type=float, default=60.0)
    ap.add_argument("--sweep-s", type=float, default=12.0)
    ap.add_argument("--gather-ms", type=float, default=GATHER_S * 1e3)
    ap.add_argument("--phase-spread-ms", type=float, default=PHASE_SPREAD_S * 1e3)
    ap.add_argument("--sections", default=",".join(BenchOptions().sections))
    ap.add_argument("--backends", default="torch,compiled")
    ap.add_argument("--stream-backends", default="compiled")
    ap.add_argument("--clip-s", type=float, default=BenchOptions.clip_s)
    ap.add_argument("--rounds", type=int, default=BenchOptions.rounds)
    ap.add_argument(
        "--buckets",
        default=",".join(str(b) for b in BenchOptions().buckets),
        help="the compiled backends' batch buckets (offline only needs the largest)",
    )
    a = ap.parse_args()
    run_bench(
        BenchOptions(
            sessions=tuple(int(x) for x in a.sessions.split(",")),
            long_s=a.long_s,
            sweep_s=a.sweep_s,
            gather_s=a.gather_ms / 1e3,
            phase_spread_s=a.phase_spread_ms / 1e3,
            sections=tuple(a.sections.split(",")),
            backends=tuple(a.backends.split(",")),
            stream_backends=tuple(a.stream_backends.split(",")),
            buckets=tuple(int(x) for x in a.buckets.split(",")),
            clip_s=a.clip_s,
            rounds=a.rounds,
        ),
        a.out,
    )
