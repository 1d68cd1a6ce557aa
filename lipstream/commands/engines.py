"""The engine commands of `lipstream`: `models`, `render`, `engines build`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from avatars.avatar import Avatar

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
    from engines.backends import create_engine
    from engines.base import EngineError
    from engines.render.audio_io import AudioError, load_audio
    from engines.render.offline import RenderOptions, render_to_files
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


@engines_app.command("build")
def engines_build_cmd(
    backend: str = typer.Option("auto", "--backend", help="auto, compiled or tensorrt."),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="MuseTalk weights folder."),
) -> None:
    """Build the compiled / TensorRT engines (cached on disk) and check them against eager."""
    import json

    from engines.backends import build_backends
    from engines.base import EngineError

    try:
        report = build_backends(str(models_dir) if models_dir else None, backend)
    except EngineError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(report, indent=1, default=str))


def register(app: typer.Typer) -> None:
    """Add the engine commands to the root `lipstream` app."""
    try:
        from lipstream.commands.models import models_app
    except ImportError as exc:  # say why when `models` is used
        log.warning("lipstream.commands.models cannot be imported: %s", exc)
        models_app = typer.Typer(help="MuseTalk weights (unavailable).")
        reason = str(exc)

        @models_app.callback(invoke_without_command=True)
        def _unavailable() -> None:
            raise _fail(f"`lipstream models` is unavailable: {reason}")

    app.add_typer(models_app, name="models", help="Download or make MuseTalk weights.")
    app.command("render")(render_cmd)
    app.add_typer(engines_app, name="engines")
