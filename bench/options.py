"""What `lipstream bench` measures: its options and the variant names it builds pipelines from.

A variant name is a pipeline backend with flags, each flag one `PipelineOptions` switch away
from the server's default: `compiled-nofold`, `compiled-stocknorm-enc2`, ... A streaming
variant may also name the scheduler's gather (`compiled-gather20`). An unknown flag fails when
the options are made, before anything is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.base import SAMPLE_RATE, check_buckets
from engines.pipeline.scheduler import GATHER_S

CHUNK = 320  # 20 ms of audio per push, as a browser / TTS sends it
# the streaming sessions' start spread: session k of n starts k x this / n after the first.
# One 20 ms chunk by default; 0.04 spreads their frames' phases over a whole frame
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
PIPELINE_BACKENDS = ("torch", "compiled", "tensorrt")

# a variant's flags: each sets one PipelineOptions field away from the server's default
VARIANT_FLAGS: dict[str, tuple[str, bool]] = {
    "nofold": ("fold_upsample", False),  # the VAE's own upsampling convolutions
    "eagerenc": ("compile_encoder", False),  # the whisper encoder eager
    "stocknorm": ("nhwc_norm", False),  # torch's own GroupNorm
    "nhwcnorm": ("nhwc_norm", True),  # channels-last GroupNorm (the default)
    "melgraph": ("log_mel_in_graph", True),  # the log-mel in the encoder's graph (the default)
    "eagermel": ("log_mel_in_graph", False),  # the log-mel as eager ops
}
ENCODER_STEP_BATCHES = (1, 2, 4, 8)  # `-encsteps`: the encoder's batch sizes


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
    # the bench's pipelines' buckets (a measurement knob: `--buckets 48` for offline alone)
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
        names = (*self.backends, *(split_gather(n)[0] for n in self.stream_backends))
        unknown = {n.split("-")[0] for n in names} - set(PIPELINE_BACKENDS)
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}")
        for name in names:
            variant_fields(name)  # a flag that names no switch fails here, before measuring
        bad = set(self.sections) - set(SECTIONS)
        if bad:
            raise ValueError(f"unknown sections {sorted(bad)}")


def variant_fields(name: str) -> tuple[str, dict[str, Any]]:
    """A variant name `<backend>[-nofold][-eagerenc][-enc<batch>|-encsteps][-stocknorm|-nhwcnorm]
    [-melgraph|-eagermel]` -> (backend, the PipelineOptions fields its flags set); no flag
    keeps the server's default. An unknown flag is a ValueError naming the known ones."""
    backend, *flags = name.split("-")
    fields: dict[str, Any] = {}
    for flag in flags:
        if flag.startswith("enc") and flag[3:].isdigit():
            fields["encoder_batch"] = int(flag[3:])
        elif flag == "encsteps":  # a graph per encoder batch, each step's calls by their times
            fields["encoder_batches"] = ENCODER_STEP_BATCHES
        elif flag in VARIANT_FLAGS:
            key, value = VARIANT_FLAGS[flag]
            fields[key] = value
        else:
            known = ", ".join([*VARIANT_FLAGS, "enc<batch>", "encsteps"])
            raise ValueError(f"unknown bench variant {flag!r} in {name!r}: flags are {known}")
    return backend, fields


def variant_options(name: str, buckets: tuple[int, ...]) -> Any:
    """PipelineOptions for a variant name (`variant_fields`), I420 out, with `buckets`."""
    from engines.pipeline.gpu import PipelineOptions

    backend, fields = variant_fields(name)
    return PipelineOptions(backend=backend, buckets=buckets, output="i420", **fields)


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


def check_backends(options: BenchOptions) -> None:
    """Fail before any measuring where a backend asked for cannot run on this host (a
    compiled variant without Triton's compiler or headers, tensorrt without its wheels):
    otherwise the bench would fail minutes in, at that backend's first compile."""
    from engines.backends import select_backend

    wanted = dict.fromkeys(b.split("-")[0] for b in (*options.backends, *options.stream_backends))
    for name in wanted:
        select_backend(name)  # EngineError naming the reason
