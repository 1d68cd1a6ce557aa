"""WHEP (WebRTC-HTTP Egress Protocol, the playback side of RFC 9725's WHIP): any WHEP player
(OBS, GStreamer's `whepsrc`, browser WHEP clients) watches an avatar.

- `POST /whep/{avatar_id}`, body an SDP offer (`Content-Type: application/sdp`) -> `201 Created`,
  the SDP answer (`application/sdp`), `Location: /whep/sessions/{session_id}` (the WHEP session
  resource), `Link` headers: the configured ICE servers (`rel="ice-server"`, as the RFC says),
  the session's audio websocket with its token (`rel="urn:lipstream:audio-ws"`) and its REST
  resource (`rel="urn:lipstream:session"`), so that a companion process can drive the speech.
- `DELETE /whep/sessions/{session_id}` ends the session (200; 404 unknown or ended).
- `PATCH` on the session: 405 with `Allow` (aiortc gathers every candidate before answering:
  no trickle ICE, no ICE restart), as the RFC allows.
- `OPTIONS` on either: 204 with `Allow` (and `Accept-Post: application/sdp` on the endpoint);
  no key needed. A CORS preflight from an origin in `cors_origins` is answered by the app's
  CORS middleware before it gets here.
- The bearer API key as for `/v1`. Errors are `application/problem+json` (RFC 9457:
  type, title, status, detail); a body that is not `application/sdp` is a 415. Every limit of
  POST /v1/sessions applies (it is the same code: `server.api.sessions.open_session`).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from server.api.sessions import BadRequest, open_session
from server.auth import require_api_key
from server.ops.starting import RETRY_AFTER_S, starting_body
from server.session.manager import SessionManager

log = logging.getLogger(__name__)

router = APIRouter(prefix="/whep", tags=["whep"])

SDP_TYPE = "application/sdp"
PROBLEM_TYPE = "application/problem+json"
AUDIO_REL = "urn:lipstream:audio-ws"
SESSION_REL = "urn:lipstream:session"
ENDPOINT_ALLOW = "POST, OPTIONS"
RESOURCE_ALLOW = "DELETE, OPTIONS"


def problem(
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    body.update(detail=detail, **(extra or {}))
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_TYPE)


def _not_started(request: Request) -> Response | None:
    """503 until the server has started (as `server.ops.starting.StartingGate` does for /v1)."""
    state = request.app.state
    if getattr(state, "started", True):
        return None
    body = starting_body(state)
    detail = "the server is starting (its engine is warming up): try again shortly"
    if body["status"] == "failed":
        detail = f"the server failed to start: {body['error']}"
    extra = {"server_status": body.pop("status"), **body}  # "status" is the problem's own
    return problem(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)}, extra=extra)


def _is_sdp(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == SDP_TYPE


async def _read_sdp(request: Request, limit: int) -> str:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest(413, f"the SDP offer is larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, f"the SDP offer is larger than {limit} bytes")
    except ClientDisconnect:
        raise BadRequest(400, "the request body was cut off") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "the SDP offer is not UTF-8") from None


def _links(request: Request, session_id: str, token: str) -> list[str]:
    servers = request.app.state.settings.ice_servers
    links = [f'<{url}>; rel="ice-server"' for url in servers]
    links.append(f'</v1/sessions/{session_id}/audio?token={token}>; rel="{AUDIO_REL}"')
    links.append(f'</v1/sessions/{session_id}>; rel="{SESSION_REL}"')
    return links


@router.post("/{avatar_id}", dependencies=[Depends(require_api_key)])
async def whep_offer(avatar_id: str, request: Request) -> Response:
    starting = _not_started(request)
    if starting is not None:
        return starting
    settings = request.app.state.settings
    if not _is_sdp(request.headers.get("content-type")):
        return problem(
            415, f"the offer must be sent as {SDP_TYPE}", headers={"Accept-Post": SDP_TYPE}
        )
    if len(avatar_id) > 64:
        return problem(404, "no such avatar")
    try:
        sdp = await _read_sdp(request, settings.max_sdp_bytes)
        session, answer = await open_session(request.app, avatar_id, sdp)
    except BadRequest as exc:
        return problem(exc.status, str(exc), headers=exc.headers, extra=exc.extra)
    location = f"/whep/sessions/{session.id}"
    response = Response(
        answer, status_code=201, media_type=SDP_TYPE, headers={"Location": location}
    )
    for link in _links(request, session.id, session.token):
        response.headers.append("Link", link)
    log.info("whep session opened", extra={"session_id": session.id, "avatar_id": avatar_id})
    return response


@router.options("/{avatar_id}")
async def whep_endpoint_options(avatar_id: str) -> Response:
    return Response(status_code=204, headers={"Allow": ENDPOINT_ALLOW, "Accept-Post": SDP_TYPE})


@router.delete("/sessions/{session_id}", dependencies=[Depends(require_api_key)])
async def whep_delete(session_id: str, request: Request) -> Response:
    starting = _not_started(request)
    if starting is not None:
        return starting
    manager: SessionManager = request.app.state.sessions
    if not await manager.end(session_id, "deleted"):
        return problem(404, f"no session {session_id[:40]!r} (unknown or ended)")
    return Response(status_code=200)


@router.patch("/sessions/{session_id}", dependencies=[Depends(require_api_key)])
async def whep_patch(session_id: str) -> Response:
    return problem(
        405,
        "trickle ICE and ICE restarts are not supported: the answer carries every candidate",
        headers={"Allow": RESOURCE_ALLOW},
    )


@router.options("/sessions/{session_id}")
async def whep_resource_options(session_id: str) -> Response:
    return Response(status_code=204, headers={"Allow": RESOURCE_ALLOW})
