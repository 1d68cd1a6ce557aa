"""REST for LiveKit avatar sessions: `POST /v1/livekit/sessions {avatar_id, url, token}`.

The server joins the LiveKit room at `url` with `token` (minted by the agent side, e.g.
`lipstream.integrations.livekit.AvatarSession`) and plays the avatar there as a LiveKit avatar
worker (`server.integrations.livekit_worker`). The session is an ordinary session of the server:
`GET` / `DELETE /v1/sessions/{id}` see and end it; it also ends when the room goes.

Where the `livekit` packages (`pip install 'lipstream[livekit]'`) do not import, the route
answers 501 and says so.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.sessions import BadRequest, _error, _read_json, session_parts
from server.auth import require_api_key
from server.avatar_service import AvatarService
from server.session.devices import Unit
from server.session.manager import SessionLimitError, SessionManager

try:
    from server.integrations import livekit_room
except ImportError as exc:  # the extra is not installed
    livekit_room = None  # type: ignore[assignment]
    _MISSING = str(exc)
else:
    _MISSING = ""

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/livekit/sessions", tags=["livekit"], dependencies=[Depends(require_api_key)]
)

BODY_LIMIT = 16 * 1024
JOIN_TIMEOUT_S = 10.0
_URL = re.compile(r"^(wss?|https?)://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?(/[\x21-\x7e]*)?$")
_JWT = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")


def available() -> bool:
    """Whether the livekit packages import here."""
    return livekit_room is not None


def join_fields(data: dict[str, Any]) -> tuple[str, str, str]:
    """(avatar_id, url, token) from the body; raises BadRequest (400) with what is wrong."""
    avatar_id, url, token = data.get("avatar_id"), data.get("url"), data.get("token")
    if not isinstance(avatar_id, str) or not avatar_id or len(avatar_id) > 64:
        raise BadRequest(400, "avatar_id must be an avatar id string")
    if not isinstance(url, str) or len(url) > 2048 or not _URL.match(url):
        raise BadRequest(
            400, "url must be the LiveKit server's ws://, wss://, http:// or https:// URL"
        )
    if not isinstance(token, str) or len(token) > 8192 or not _JWT.match(token):
        raise BadRequest(
            400, "token must be a LiveKit access token (a JWT: three dot-separated parts)"
        )
    return avatar_id, url, token


@router.post("")
async def create_livekit_session(request: Request) -> Response:
    if livekit_room is None:
        return _error(
            501,
            "LiveKit is not installed on this server: pip install 'lipstream[livekit]' "
            f"({_MISSING})",
        )
    try:
        data = await _read_json(request, BODY_LIMIT)
        avatar_id, url, token = join_fields(data)
    except BadRequest as exc:
        return _error(exc.status, str(exc))
    app = request.app
    manager: SessionManager = app.state.sessions
    try:
        async with manager.slot():
            sid, unit = manager.place(avatar_id)
            try:
                session, worker = await _join(app, sid, unit, avatar_id, url, token)
            except BaseException:
                manager.unplace(sid)
                raise
            manager.add(session)
    except BadRequest as exc:
        return _error(exc.status, str(exc), headers=exc.headers, extra=exc.extra)
    except SessionLimitError as exc:
        return _error(
            503,
            str(exc),
            headers={"Retry-After": str(exc.retry_after)},
            extra={"reason": exc.reason},
        )
    log.info(
        "livekit session opened",
        extra={"session_id": session.id, "avatar_id": avatar_id, "room": worker.room_name},
    )
    return JSONResponse(
        {"session_id": session.id, "room": worker.room_name, "identity": worker.identity},
        status_code=201,
    )


async def _join(
    app: Any, sid: str, unit: Unit | None, avatar_id: str, url: str, token: str
) -> tuple[Any, Any]:
    """The session on `unit`, joined to the room: (session, its room worker). BadRequest 404
    / 409 (avatar), 502 (the room could not be joined)."""
    assert livekit_room is not None
    avatars: AvatarService = app.state.avatars
    manager: SessionManager = app.state.sessions
    unit, fields = await session_parts(app, sid, unit, avatar_id)
    parts = livekit_room.RoomParts(**fields)
    try:
        session, worker = await livekit_room.open_room_session(
            parts, url, token, manager.end_soon, JOIN_TIMEOUT_S
        )
    except ConnectionError as exc:
        raise BadRequest(502, str(exc)) from None
    session.device = unit.device
    if avatars.deleted(avatar_id):
        await session.close("avatar_deleted")
        raise BadRequest(404, f"no avatar {avatar_id!r} (deleted)")
    return session, worker
