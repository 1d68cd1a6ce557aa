"""The engine commands of `lipstream`: `models`, `render`, `bench`, `engines build`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from avatars.avatar import Avatar
from engines.bench import PHASE_SPREAD_S, BenchOptions
from engines.scheduler import GATHER_S

log = logging.getLogger(__name__)

engines_app = typer.Typer(
    help="Engine backends (TensorRT / compiled builds).", no_args_is_help=True
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def render_cmd(
    avatar: str = typer.Option(..., "--avatar", help="Avatar name or id."),
    audio: Path = typer.Option(..., "--audio", help="Speech audio: any format FFmpeg decodes."),
    out: Path = typer.Option(..., "--out", help="Output mp4 (H.264 25 fps + the audio as AAC)."),
    frames_dir: Path | None = typer.Option(
        None, "--frames-dir", help="Also write each frame as PNG here."
    ),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="MuseTalk weights folder."),
    avatars_dir: Path | None = typer.Option(None, "--avatars-dir", help="Prepared avatars folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Frames per model batch."),
    engine: str = typer.Option("musetalk", "--engine", help="musetalk, preview or auto."),
    backend: str = typer.Option("torch", "--backend", help="MuseTalk backend."),
    streaming: bool = typer.Option(
        False,
        "--streaming",
        help="Features the way the server computes them (audio in 40 ms chunks).",
    ),
) -> None:
    """Lip-sync AVATAR to AUDIO into an mp4 (floor(duration x 25) frames)."""
    from engines.audio_io import AudioError, load_audio
    from engines.base import EngineError
    from engines.factory import create_engine
    from engines.render import RenderOptions, render_to_files
    from lipstream.paths import avatars_dir as resolve_avatars_dir
    from lipstream.paths import models_dir as resolve_models_dir

    try:
        pcm = load_audio(audio)
    except AudioError as exc:
        raise _fail(str(exc)) from exc
    try:
        the_avatar = _load_avatar(avatar, resolve_avatars_dir(avatars_dir))
    except LookupError as exc:
        raise _fail(str(exc)) from exc
    try:
        eng, reason = create_engine(
            engine, resolve_models_dir(models_dir), device, backend, batch_size
        )
    except EngineError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"engine: {eng.name} ({reason})", err=True)
    options = RenderOptions(batch_size=batch_size, streaming=streaming, chunk_samples=640)
    try:
        result = render_to_files(eng, the_avatar, pcm, out, frames_dir, options)
    except (EngineError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(
        f"wrote {out}: {result.frames} frames in {result.seconds:.2f} s, {result.fps:.1f} fps "
        f"({result.engine}, video {result.encoder})"
    )


def _load_avatar(name_or_id: str, root: Path) -> Avatar:
    """The prepared avatar by id or name; LookupError with the reason otherwise."""
    from avatars.store import AvatarNotFoundError, AvatarStore, AvatarStoreError

    store = AvatarStore(root)
    try:
        return store.load(store.resolve(name_or_id))
    except AvatarNotFoundError as exc:
        raise LookupError(
            f"no avatar {name_or_id!r} in {root}: add one with `lipstream avatar add`"
        ) from exc
    except AvatarStoreError as exc:
        raise LookupError(f"avatar {name_or_id!r} in {root}: {exc}") from exc


def bench_cmd(
    soak: bool = typer.Option(False, "--soak", help="Soak over real WebRTC (server.soak)"),
    ramp: bool = typer.Option(
        False,
        "--ramp",
        help="Admission ramp against --soak-url (server.ramp): one more session every "
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
        "torch,compiled", "--backends", help="Offline backends (name[-cropN])."
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
        from server.malloc_bench import run_malloc_bench

        try:
            run_malloc_bench(malloc_frames, out)
        except (RuntimeError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        return
    if ramp:
        import httpx

        from server.ramp import run_ramp

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
    if soak:  # H7: the server soak (engine etc. from LIPSTREAM_* as for `serve`)
        from server.soak import run_soak

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
    from engines.base import EngineError
    from engines.bench import run_bench

    try:
        opts = BenchOptions(
            models_dir=str(models_dir) if models_dir else None,
            sessions=tuple(int(x) for x in (sessions or "1,8,12,16,20,24").split(",")),
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


@engines_app.command("build")
def engines_build_cmd(
    backend: str = typer.Option("auto", "--backend", help="auto, compiled or tensorrt."),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="MuseTalk weights folder."),
) -> None:
    """Build the compiled / TensorRT engines (cached on disk) and check them against eager."""
    import json

    from engines.base import EngineError
    from engines.bench import build_backends

    try:
        report = build_backends(str(models_dir) if models_dir else None, backend)
    except EngineError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(report, indent=1, default=str))


def register(app: typer.Typer) -> None:
    """Add the engine commands to the root `lipstream` app."""
    try:
        from engines.models_cli import models_app
    except ImportError as exc:  # H1's module not there: say so when `models` is used
        log.warning("engines.models_cli cannot be imported: %s", exc)
        models_app = typer.Typer(help="MuseTalk weights (unavailable).")
        reason = str(exc)

        @models_app.callback(invoke_without_command=True)
        def _unavailable() -> None:
            raise _fail(f"`lipstream models` is unavailable: {reason}")

    app.add_typer(models_app, name="models", help="Download or make MuseTalk weights.")
    app.command("render")(render_cmd)
    app.command("bench")(bench_cmd)
    app.add_typer(engines_app, name="engines")
