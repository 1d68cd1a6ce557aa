"""REST for sessions: POST (SDP offer -> answer), GET (state and stats), DELETE."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from avatars.store import AvatarNotFoundError
from server.auth import require_api_key
from server.avatar_service import AvatarNotReady, AvatarService
from server.media.advertise import advertise
from server.media.pictures import AvatarPictures
from server.media.pool import MediaProcessError
from server.media.webrtc import OfferError, check_offer
from server.session.devices import Unit
from server.session.manager import SessionLimitError, SessionManager
from server.session.session import Session
from server.session.worker import WorkerStopped

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_api_key)]
)

BODY_SLACK = 4096  # JSON framing and the other fields, beyond the SDP itself


class BadRequest(ValueError):
    """A refusal with its HTTP status (and headers, extra body fields): the route formats it."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.extra = extra


def _error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse({"detail": message, **(extra or {})}, status_code=status, headers=headers)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, f"the request body is larger than {limit} bytes")
    except ClientDisconnect:  # gone mid-body (or cut off by the body timeout): nobody to answer
        raise BadRequest(400, "the request body was cut off") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadRequest(400, 'the body must be JSON: {avatar_id, sdp, type: "offer"}') from None
    if not isinstance(data, dict):
        raise BadRequest(400, 'the body must be a JSON object: {avatar_id, sdp, type: "offer"}')
    return data


def _offer_fields(data: dict[str, Any]) -> tuple[str, str]:
    avatar_id, sdp, kind = data.get("avatar_id"), data.get("sdp"), data.get("type", "offer")
    if not isinstance(avatar_id, str) or not avatar_id or len(avatar_id) > 64:
        raise BadRequest(400, "avatar_id must be an avatar id string")
    if kind != "offer":
        raise BadRequest(400, 'type must be "offer"')
    if not isinstance(sdp, str):
        raise BadRequest(400, "sdp must be a string")
    return avatar_id, sdp


@router.post("")
async def create_session(request: Request) -> Response:
    settings = request.app.state.settings
    try:
        data = await _read_json(request, settings.max_sdp_bytes + BODY_SLACK)
        avatar_id, sdp = _offer_fields(data)
        session, answer = await open_session(request.app, avatar_id, sdp)
    except BadRequest as exc:
        return _error(exc.status, str(exc), headers=exc.headers, extra=exc.extra)
    return JSONResponse(
        {
            "session_id": session.id,
            "sdp": answer,
            "type": "answer",
            "audio_ws": f"/v1/sessions/{session.id}/audio",
            "token": session.token,
        },
        status_code=201,
    )


async def open_session(app: Any, avatar_id: str, sdp: str) -> tuple[Session, str]:
    """Check the offer, take a session slot, negotiate, register the session: (session,
    answer SDP). Every refusal raises BadRequest (400 offer, 404/409 avatar, 503 limits);
    POST /v1/sessions and WHEP (server.api.whep) both open sessions here."""
    settings = app.state.settings
    manager: SessionManager = app.state.sessions
    avatars: AvatarService = app.state.avatars
    try:
        check_offer(sdp, settings)
    except OfferError as exc:
        raise BadRequest(400, str(exc)) from None
    try:
        async with manager.slot():
            sid, unit = manager.place(avatar_id)
            try:
                session = await _new_session(app, sid, unit, avatar_id)
                answer, sending = await _negotiate(app, session, sdp)
                if avatars.deleted(avatar_id):  # the delete began while this one negotiated
                    await session.close("avatar_deleted")
                    raise BadRequest(404, f"no avatar {avatar_id!r} (deleted)")
            except BaseException:
                manager.unplace(sid)
                raise
            session.wanted = sending
            manager.add(session)  # no await since the check: the delete ends it, or it saw it
    except SessionLimitError as exc:
        raise BadRequest(
            503,
            str(exc),
            headers={"Retry-After": str(exc.retry_after)},
            extra={"reason": exc.reason},
        ) from None
    log.info(
        "session opened",
        extra={
            "session_id": session.id,
            "avatar_id": avatar_id,
            "device": unit.device if unit is not None else None,
            "tracks": sorted(sending),
        },
    )
    return session, answer


async def session_parts(
    app: Any, sid: str, unit: Unit | None, avatar_id: str
) -> tuple[Unit, dict[str, Any]]:
    """What a session on `unit` (None: the primary) is built from, its avatar made resident
    there: (unit, the Session's keyword arguments). BadRequest 404/409 where the avatar is
    unknown or not ready. WebRTC and LiveKit sessions are both built from these."""
    avatars: AvatarService = app.state.avatars
    unit = unit or app.state.devices.primary
    try:
        avatar = await avatars.ready(avatar_id, unit)
    except AvatarNotFoundError as exc:
        raise BadRequest(404, str(exc)) from None
    except AvatarNotReady as exc:
        raise BadRequest(409, str(exc)) from None
    except WorkerStopped:  # its device faulted since it was chosen
        retry = {"Retry-After": str(app.state.settings.retry_after_s)}
        raise BadRequest(
            503,
            f"the device {unit.device} failed while the session opened; try again",
            headers=retry,
            extra={"reason": "engine_failed"},
        ) from None
    return unit, {
        "avatar": avatar,
        "pictures": AvatarPictures(avatar, unit.engine, app.state.idle_frames),
        "worker": unit.worker,
        "settings": app.state.settings,
        "metrics": app.state.metrics,
        "sid": sid,
    }


async def _new_session(app: Any, sid: str, unit: Unit | None, avatar_id: str) -> Session:
    unit, parts = await session_parts(app, sid, unit, avatar_id)
    session = Session(**parts)
    session.device = unit.device
    return session


async def _negotiate(app: Any, session: Session, sdp: str) -> tuple[str, set[str]]:
    """The session's peer connection answered: (answer SDP, the tracks it sends). A refusal
    closes the session and raises BadRequest (400 offer, 503 media processes down)."""
    settings = app.state.settings
    manager: SessionManager = app.state.sessions

    def on_state(state: str) -> None:
        if state == "connected":
            session.mark_connected()
        elif state in ("failed", "closed"):
            manager.end_soon(session.id, f"peer_{state}")

    try:
        link = app.state.media.link(session.media_events(on_state), session.pictures.shape)
        session.media = link
        answer, sending = await link.negotiate(sdp)
        return advertise(answer, settings.ice_advertise_address), set(sending)
    except OfferError as exc:
        await session.close("bad_offer")
        raise BadRequest(400, str(exc)) from None
    except MediaProcessError as exc:
        await session.close("error")
        retry = {"Retry-After": str(settings.retry_after_s)}
        raise BadRequest(503, str(exc), headers=retry) from None
    except BaseException:
        await session.close("error")
        raise


def _session(request: Request, session_id: str) -> Session | None:
    manager: SessionManager = request.app.state.sessions
    return manager.get(session_id)


@router.get("/{session_id}")
async def get_session(session_id: str, request: Request) -> Response:
    session = _session(request, session_id)
    if session is None:
        return _error(404, f"no session {session_id[:40]!r} (unknown or ended)")
    session.touch()  # a client polling its stats keeps its session alive
    return JSONResponse(session.info())


@router.delete("/{session_id}")
async def delete_session(session_id: str, request: Request) -> Response:
    manager: SessionManager = request.app.state.sessions
    if not await manager.end(session_id, "deleted"):
        return _error(404, f"no session {session_id[:40]!r} (unknown or ended)")
    return JSONResponse({"session_id": session_id, "ended": True})
