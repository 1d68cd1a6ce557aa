"""The `lipstream` command: each package contributes its own sub-commands."""

from __future__ import annotations

import importlib
import logging

import typer

from lipstream import logs

app = typer.Typer(
    name="lipstream",
    help="Real-time streaming talking-avatar server (MuseTalk v1.5 over WebRTC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from lipstream.commands.avatar import avatar_app
    from lipstream.commands.engines import register as register_engine_commands
    from lipstream.commands.livekit import livekit_app
    from lipstream.commands.serve import register as register_server_commands

    app.add_typer(avatar_app, name="avatar", help="Register, list, show and remove avatars.")
    app.add_typer(livekit_app, name="livekit", help="Play an avatar in a LiveKit room.")
    register_engine_commands(app)
    register_server_commands(app)
    _register_bench()


def _register_bench() -> None:
    """`lipstream bench` comes from the `bench` package, which sits above every other layer:
    it is looked up by name, so that no product module imports it."""
    try:
        bench_cli = importlib.import_module("bench.cli")
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("bench"):
            raise

        @app.command("bench")
        def _no_bench() -> None:
            """Benchmarks (not installed: the `bench` package is missing)."""
            typer.secho("error: the bench package is not installed", err=True, fg="red")
            raise typer.Exit(1)

        return
    bench_cli.register(app)


def main() -> None:
    logs.setup(logging.INFO)
    _register()
    app()
