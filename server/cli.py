"""`lipstream serve`: build the engine (saying which and why), then run uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command(
        "serve", help="Run the streaming server (REST, WebRTC, audio websocket, demo page)."
    )(serve)


def serve(
    engine: str = typer.Option(
        None, help="auto | musetalk | preview  (env LIPSTREAM_ENGINE; default auto)"
    ),
    models_dir: Path = typer.Option(
        None, help="MuseTalk weights folder (env LIPSTREAM_MODELS_DIR)"
    ),
    avatars_dir: Path = typer.Option(
        None, help="Prepared avatars folder (env LIPSTREAM_AVATARS_DIR)"
    ),
    device: str = typer.Option(None, help="auto | cpu | cuda[:N]  (env LIPSTREAM_DEVICE)"),
    backend: str = typer.Option(None, help="torch | compiled | tensorrt  (env LIPSTREAM_BACKEND)"),
    host: str = typer.Option(None, help="Address to bind (env LIPSTREAM_HOST; default 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (env LIPSTREAM_PORT; default 8000)"),
    max_sessions: int = typer.Option(
        None, help="Concurrent sessions before 503 (env LIPSTREAM_MAX_SESSIONS)"
    ),
    demo_avatar: bool = typer.Option(
        None, "--demo-avatar/--no-demo-avatar", help="Register the astronaut avatar on first start"
    ),
    log_level: str = typer.Option("info", help="debug | info | warning"),
) -> None:
    import uvicorn

    from engines.base import EngineError
    from server.app import build_engine, create_app
    from server.settings import Settings, SettingsError

    logging.getLogger().setLevel(log_level.upper())
    try:
        settings = Settings.from_env(
            engine=engine,
            models_dir=models_dir,
            avatars_dir=avatars_dir,
            device=device,
            backend=backend,
            host=host,
            port=port,
            max_sessions=max_sessions,
            demo_avatar=demo_avatar,
        )
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        chosen, reason = build_engine(settings)
    except EngineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    log.info("engine %s chosen: %s", chosen.name, reason)
    typer.echo(f"lipstream: engine {chosen.name} ({reason})", err=True)
    app = create_app(settings, engine=chosen, reason=reason)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_max_size=settings.ws_max_message_bytes,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )
