"""The `lipstream` command: each package contributes its own sub-commands."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="lipstream",
    help="Real-time streaming talking-avatar server (MuseTalk v1.5 over WebRTC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from avatars.cli import avatar_app
    from engines.cli import register as register_engine_commands
    from server.cli import register as register_server_commands

    app.add_typer(avatar_app, name="avatar", help="Register, list and remove avatars.")
    register_engine_commands(app)
    register_server_commands(app)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _register()
    app()
