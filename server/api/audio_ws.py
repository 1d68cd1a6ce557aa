"""The audio websocket: `/v1/sessions/{id}/audio?token=...`.

Client -> server:
  binary   PCM s16le mono 16 kHz, any (even) number of bytes per message
  text     {"type": "end"}    the utterance is complete: its last frames are made and played
           {"type": "clear"}  interrupt: queued audio and frames are dropped, idle at once

Server -> client (text JSON):
  {"type": "playback_started"}
  {"type": "playback_finished", "position": seconds played, "interrupted": bool}
  {"type": "error", "code": "...", "message": "..."}   the session goes on
  {"type": "session_ended", "reason": "..."}

A wrong or missing token closes the socket with 1008 before anything is read. A second socket
for the same session replaces the first (which is closed with 1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from server.auth import token_matches
from server.session.manager import SessionManager
from server.session.session import AudioRefused, Session

log = logging.getLogger(__name__)

router = APIRouter()

MAX_TEXT = 4096  # bytes of a control message


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


@router.websocket("/v1/sessions/{session_id}/audio")
async def audio_socket(websocket: WebSocket, session_id: str) -> None:
    manager: SessionManager = websocket.app.state.sessions
    token = websocket.query_params.get("token", "")
    session = manager.get(session_id)
    if session is None or session.closed or not token_matches(token, session.token):
        await websocket.close(code=1008, reason="unknown session or wrong token")
        return
    await websocket.accept()
    events, previous = session.attach(websocket)
    if previous is not None:
        with contextlib.suppress(Exception):
            await previous.close(code=1000, reason="replaced by a newer connection")
    sender = asyncio.create_task(_send_events(websocket, events), name=f"ws-events-{session.id}")
    try:
        await _receive(websocket, session, websocket.app.state.settings)
    except WebSocketDisconnect:
        log.debug("audio websocket closed by the client", extra={"session_id": session.id})
    except RuntimeError as exc:  # the socket was closed under us (session ended, replaced)
        log.debug("audio websocket gone", extra={"session_id": session.id, "error": str(exc)})
    finally:
        session.detach(websocket)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _send_events(websocket: WebSocket, events: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        event = await events.get()
        try:
            await websocket.send_text(json.dumps(event))
            if event["type"] == "session_ended":
                await websocket.close(code=1000, reason="session ended")
                return
        except Exception:
            return


async def _receive(websocket: WebSocket, session: Session, settings: Any) -> None:
    max_bytes = settings.ws_max_message_bytes
    while not session.closed:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        text = message.get("text")
        if data is not None:
            if len(data) > max_bytes:
                session.emit(
                    _error("too_large", f"binary messages are limited to {max_bytes} bytes")
                )
                continue
            try:
                session.push_audio(data)  # the rate limit is the session's: per session
            except AudioRefused as exc:
                session.emit(_error(exc.code, str(exc)))
        elif text is not None:
            _control(session, text)


def _control(session: Session, text: str) -> None:
    if len(text) > MAX_TEXT:
        session.emit(_error("too_large", f"control messages are limited to {MAX_TEXT} bytes"))
        return
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting fits in MAX_TEXT and recurses
        session.emit(_error("bad_json", 'control messages are JSON objects like {"type": "end"}'))
        return
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind == "end":
        session.end_utterance()
    elif kind == "clear":
        session.clear()
    else:
        session.emit(
            _error("unknown_type", f"unknown message type {str(kind)[:40]!r}: use end or clear")
        )
