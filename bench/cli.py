"""`lipstream bench`: registered on the root command when the `bench` package is installed."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.runner import PHASE_SPREAD_S, BenchOptions
from engines.pipeline.scheduler import GATHER_S


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _require_bench_extra(flag: str) -> None:
    """--soak and --ramp drive a server over HTTP with httpx, which only the `bench` extra
    installs: say so instead of failing on the import."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise _fail(
            f"{flag} needs lipstream's bench extra: pip install 'lipstream[bench]'"
        ) from None


def bench_cmd(
    soak: bool = typer.Option(False, "--soak", help="Soak over real WebRTC (bench.soak)"),
    ramp: bool = typer.Option(
        False,
        "--ramp",
        help="Admission ramp against --soak-url (bench.ramp): one more session every "
        "--ramp-every s, at most --sessions, until the server refuses them as overloaded",
    ),
    ramp_every: float = typer.Option(
        4.0, "--ramp-every", min=0.1, help="--ramp: seconds between attempts"
    ),
    malloc: bool = typer.Option(
        False, "--malloc", help="Cost of the frame-buffer allocator strategies (CPU only)"
    ),
    malloc_frames: int = typer.Option(3000, "--malloc-frames", help="--malloc: frames per thread"),
    sessions: str | None = typer.Option(
        None,
        help="--soak: concurrent sessions (default 2); --ramp: attempts at most (default 24); "
        "else session counts to sweep, e.g. 1,8,16,20",
    ),
    minutes: float = typer.Option(1.0, help="--soak: how long"),
    soak_out: Path = typer.Option(None, help="--soak, --ramp: write the JSON result here"),
    soak_url: str | None = typer.Option(
        None,
        "--soak-url",
        help="--soak: use this running server (e.g. one already warmed up) instead of starting "
        "one; --ramp: the server to ramp (required)",
    ),
    soak_pid: int | None = typer.Option(
        None, "--soak-pid", help="--soak-url: the server's pid, to sample its RSS and GPU memory"
    ),
    soak_clients: int = typer.Option(
        1,
        "--soak-clients",
        help="--soak-url, --ramp: client processes to spread the sessions over (one Python "
        "process receiving a dozen 720p streams is itself the bottleneck)",
    ),
    soak_decode: bool = typer.Option(
        True,
        "--soak-decode/--soak-no-decode",
        help="--soak: decode the video in the clients, or only time frames and their RTP "
        "timestamps (the clients then leave the host's cores to the server)",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="JSON path (default bench/results/<gpu>_<date>.json)."
    ),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="Weights (default: random, full size)."
    ),
    long_s: float = typer.Option(60.0, "--long-s", help="Seconds of the run at 20 sessions."),
    sweep_s: float = typer.Option(12.0, "--sweep-s", help="Seconds per sweep point."),
    gather_ms: float = typer.Option(
        GATHER_S * 1e3, "--gather-ms", help="Streaming: the scheduler's gather_s in ms (0: off)."
    ),
    phase_spread_ms: float = typer.Option(
        PHASE_SPREAD_S * 1e3,
        "--phase-spread-ms",
        help="Streaming: the sessions start this spread apart in all (40: frame phases at random).",
    ),
    backends: str = typer.Option(
        "torch,compiled", "--backends", help="Offline variants: backend[-flag...] (bench.options)."
    ),
    stream_backends: str = typer.Option(
        "compiled", "--stream-backends", help="Streaming backends."
    ),
    sections: str = typer.Option("", "--sections", help="Comma list (default: all)."),
    buckets: str | None = typer.Option(
        None,
        "--buckets",
        help="The compiled backends' batch buckets, e.g. 48 for offline alone (default: "
        "2,4,...,48).",
    ),
    clip_s: float = typer.Option(
        BenchOptions.clip_s, "--clip-s", help="Offline: seconds of speech per run."
    ),
    rounds: int = typer.Option(
        BenchOptions.rounds,
        "--rounds",
        help="Offline pipeline: interleaved timed runs per variant.",
    ),
) -> None:
    """Measure throughput and streaming latency against MuseTalk's own way (needs a GPU);
    with --soak, soak a real server over WebRTC instead; with --ramp, find where a running
    server starts refusing sessions; with --malloc, measure the allocator."""
    if malloc:
        from bench.malloc_bench import run_malloc_bench

        try:
            run_malloc_bench(malloc_frames, out)
        except (RuntimeError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        return
    if ramp:
        _require_bench_extra("--ramp")
        import httpx

        from bench.ramp import run_ramp

        if soak_url is None:
            raise typer.BadParameter("--ramp needs --soak-url: the running server to ramp")
        try:
            attempts = int(sessions or 24)
        except ValueError:
            raise typer.BadParameter(
                f"--ramp: --sessions is one number of attempts, got {sessions!r}"
            ) from None
        try:
            run_ramp(
                soak_url,
                soak_out,
                every_s=ramp_every,
                max_sessions=attempts,
                client_processes=soak_clients,
            )
        except (ValueError, RuntimeError, httpx.HTTPError) as exc:
            raise _fail(f"the ramp against {soak_url}: {exc}") from exc
        return
    if soak:  # the server soak (engine etc. from LIPSTREAM_* as for `serve`)
        _require_bench_extra("--soak")
        from bench.soak import run_soak

        if soak_pid is not None and soak_url is None:
            raise typer.BadParameter("--soak-pid goes with --soak-url")
        if soak_clients > 1 and soak_url is None:
            raise typer.BadParameter("--soak-clients goes with --soak-url")
        run_soak(
            int(sessions or 2),
            minutes,
            soak_out,
            server_url=soak_url,
            server_pid=soak_pid,
            client_processes=soak_clients,
            decode=soak_decode,
        )
        return
    from bench.runner import run_bench
    from engines.base import EngineError

    try:
        opts = BenchOptions(
            models_dir=str(models_dir) if models_dir else None,
            sessions=tuple(int(x) for x in sessions.split(","))
            if sessions
            else BenchOptions.sessions,
            long_s=long_s,
            sweep_s=sweep_s,
            gather_s=gather_ms / 1e3,
            phase_spread_s=phase_spread_ms / 1e3,
            backends=tuple(backends.split(",")),
            stream_backends=tuple(stream_backends.split(",")),
            sections=tuple(sections.split(",")) if sections else BenchOptions().sections,
            buckets=tuple(int(x) for x in buckets.split(","))
            if buckets
            else BenchOptions().buckets,
            clip_s=clip_s,
            rounds=rounds,
        )
        run_bench(opts, out)
    except (EngineError, ValueError) as exc:
        raise _fail(str(exc)) from exc


def register(app: typer.Typer) -> None:
    """Add `lipstream bench` to the root app."""
    app.command("bench")(bench_cmd)
