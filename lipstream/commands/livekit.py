"""`lipstream livekit join`: ask a running lipstream server to play an avatar in a LiveKit room
(one-off use; an agent uses `lipstream.integrations.livekit.AvatarSession`)."""

from __future__ import annotations

import asyncio
import logging

import typer

logger = logging.getLogger(__name__)

livekit_app = typer.Typer(no_args_is_help=True, help="Play an avatar in a LiveKit room.")


@livekit_app.callback()
def _group() -> None:
    """Play an avatar in a LiveKit room (`join`); more sub-commands may come."""


@livekit_app.command("join")
def join_cmd(
    avatar: str = typer.Option(..., "--avatar", help="The lipstream avatar id."),
    room: str | None = typer.Option(
        None, "--room", help="Room to join (a token is minted with LIVEKIT_API_KEY/SECRET)."
    ),
    token: str | None = typer.Option(
        None, "--token", help="A ready access token for the avatar worker (instead of --room)."
    ),
    url: str | None = typer.Option(
        None, "--url", envvar="LIVEKIT_URL", help="The LiveKit server's URL (LIVEKIT_URL)."
    ),
    server: str = typer.Option(
        "http://127.0.0.1:8000", "--server", envvar="LIPSTREAM_URL", help="The lipstream server."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="LIPSTREAM_API_KEY", help="The lipstream server's API key."
    ),
    identity: str = typer.Option(
        "lipstream-avatar", "--identity", help="The avatar's participant identity (with --room)."
    ),
    on_behalf_of: str | None = typer.Option(
        None, "--on-behalf-of", help="The agent participant the avatar publishes for (--room)."
    ),
) -> None:
    """Join the room: the server answers with the session id (end it with
    DELETE /v1/sessions/{id}); the avatar plays the audio an agent streams to `identity`."""
    try:
        from lipstream.integrations.livekit import (
            LipstreamError,
            LiveKitCredentials,
            request_join,
            worker_token,
        )
    except ImportError as exc:
        typer.secho(
            f"error: LiveKit is not installed: pip install 'lipstream[livekit]' ({exc})",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(1) from exc
    if (room is None) == (token is None):
        typer.secho("error: give exactly one of --room and --token", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    try:
        if token is None:
            credentials = LiveKitCredentials.from_env(url)
            url = credentials.url
            token = worker_token(credentials, str(room), identity, on_behalf_of)
        if not url:
            raise LipstreamError("the LiveKit url must be given (--url or LIVEKIT_URL)")
        answer = asyncio.run(request_join(server, avatar, url, token, api_key))
    except LipstreamError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(f"joined room {answer.get('room')!r} as {answer.get('identity')!r}")
    typer.echo(f"session {answer.get('session_id')} (DELETE /v1/sessions/{{id}} to leave)")
