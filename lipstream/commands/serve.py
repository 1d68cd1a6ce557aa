"""`lipstream serve`: build the engine, then run uvicorn (the server logs which and why)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from lipstream import logs


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
    devices: str = typer.Option(None, help="all | 0,1,...: GPUs (env LIPSTREAM_DEVICES)"),
    backend: str = typer.Option(
        None,
        help="auto (default: compiled on a GPU, torch on CPU) | torch | compiled | tensorrt  (env LIPSTREAM_BACKEND)",
    ),
    host: str = typer.Option(None, help="Address to bind (env LIPSTREAM_HOST; default 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (env LIPSTREAM_PORT; default 8000)"),
    max_sessions: int = typer.Option(
        None, help="Concurrent sessions before 503 (env LIPSTREAM_MAX_SESSIONS)"
    ),
    demo_avatar: bool = typer.Option(
        None, "--demo-avatar/--no-demo-avatar", help="Register the astronaut avatar on first start"
    ),
    api_key: str = typer.Option(
        None,
        help="API key(s) for REST, comma-separated (env LIPSTREAM_API_KEY; prefer the env: "
        "a flag shows in `ps`)",
        show_default=False,
    ),
    insecure: bool = typer.Option(
        None, "--insecure/--no-insecure", help="Allow a non-loopback --host with no API key"
    ),
    drain_grace_s: float = typer.Option(
        None,
        help="SIGTERM: seconds live sessions may run before exit (env LIPSTREAM_DRAIN_GRACE_S)",
    ),
    set_: list[str] = typer.Option(
        None,
        "--set",
        help="Any other setting, NAME=VALUE (repeatable), e.g. --set max_upload_bytes=52428800; "
        "names as in README 'Security and limits' (env LIPSTREAM_<NAME>)",
    ),
    log_level: str = typer.Option("info", help="debug | info | warning"),
) -> None:
    import dataclasses

    import uvicorn

    from engines.base import EngineError
    from server.app import create_app, engines_for, uvicorn_options
    from server.ops import malloc_tuning
    from server.ops.conn_guard import fit_fd_limit
    from server.ops.drain import DrainingServer, reserve_s
    from server.settings import Settings, SettingsError, parse_assignments

    logging.getLogger().setLevel(log_level.upper())
    try:
        flags = {
            "engine": engine,
            "models_dir": models_dir,
            "avatars_dir": avatars_dir,
            "device": device,
            "backend": backend,
            "host": host,
            "port": port,
            "max_sessions": max_sessions,
            "demo_avatar": demo_avatar,
            "api_key": api_key,
            "insecure": insecure,
            "drain_grace_s": drain_grace_s,
        }
        overrides = parse_assignments(set_ or [])
        overrides.update({k: v for k, v in flags.items() if v is not None})
        settings, _ = resolve_devices(Settings.from_env(**overrides), devices, _gpu_count)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None
    connections = fit_fd_limit(settings.max_connections)
    settings = dataclasses.replace(settings, max_connections=connections)
    malloc_tuning.start(settings.malloc_trim_interval_s)  # before the media processes start
    try:  # one engine per GPU of `devices` (loaded in parallel), else the one
        chosen, reason = engines_for(settings)
    except EngineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    app = create_app(settings, engine=chosen, reason=reason)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        log_config=logs.UVICORN_LOG_CONFIG,
        timeout_graceful_shutdown=max(1, int(reserve_s(settings.drain_grace_s))),
        **uvicorn_options(settings),  # connection limits (server.ops.conn_guard, ws_guard)
    )
    DrainingServer(config, app, settings.drain_grace_s).run()
    error = getattr(app.state, "start_error", None)
    if error is not None:  # the parts failed to start behind the open port (server.ops.starting)
        typer.echo(f"error: the server failed to start: {error}", err=True)
        raise typer.Exit(1)


def _gpu_count() -> int:
    from server.app import gpu_count

    return gpu_count()


def resolve_devices(
    settings: Any, devices: str | None, gpu_count: Callable[[], int]
) -> tuple[Any, tuple[str, ...]]:
    """The `devices` setting (the flag `devices` over it where given) resolved: (settings,
    the GPUs). Empty -> the settings as they are and no list; one GPU -> `device` set to it;
    several -> the list, one engine and scheduler each. SettingsError where it cannot be."""
    import dataclasses

    from server.session.placement import device_list
    from server.settings import SettingsError

    if devices is not None:
        settings = dataclasses.replace(settings, devices=devices)
    if not settings.devices:
        return settings, ()
    try:
        names = device_list(settings.devices, gpu_count())
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if len(names) == 1:
        return dataclasses.replace(settings, device=names[0], devices=""), names
    return settings, names
