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

Every message, whatever it holds, counts against the session's `MessageBudget` (settings
`ws_messages_per_s`, `ws_message_burst`, `ws_bytes_per_s`, `ws_byte_burst`). Past it the socket
is closed with 1008 and the server stops reading it at once; the session itself goes on, and a
new socket is refused (1008 before the handshake completes) until the budget has refilled to
half. Closing, rather than dropping messages, is what bounds the work: a dropped message has
already cost its parsing, and a client writing as fast as it can would keep the event loop busy
parsing. Messages handled back to back give the event loop a turn every `YIELD_EVERY`.
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
YIELD_EVERY = 32  # messages handled back to back before other work gets a turn
CLOSE_FLUSH_S = 0.25  # a socket closed over budget: time for the close frame to leave


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
    if not session.ws_budget.ready(session.loop.time()):
        _note_over_budget(session, "refused")
        await websocket.close(code=1008, reason="over the message budget: try again shortly")
        return
    await websocket.accept()
    events, previous = session.attach(websocket)
    if previous is not None:
        with contextlib.suppress(Exception):
            await previous.close(code=1000, reason="replaced by a newer connection")
    sender = asyncio.create_task(_send_events(websocket, events), name=f"ws-events-{session.id}")
    try:
        over = await _receive(websocket, session, websocket.app.state.settings)
        if over is not None:
            await _close_over_budget(websocket, session, over, websocket.app.state.settings)
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


async def _receive(websocket: WebSocket, session: Session, settings: Any) -> str | None:
    """Handle messages until the socket or the session ends (None) or the budget runs out
    (what ran out: "messages" or "bytes")."""
    max_bytes = settings.ws_max_message_bytes
    handled = 0
    while not session.closed:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        text = message.get("text")
        over = session.ws_budget.take(len(data or text or ""), session.loop.time())
        if over is not None:
            return over
        handled += 1
        if handled % YIELD_EVERY == 0:  # queued messages are handed over without a pause
            await asyncio.sleep(0)
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
    return None


async def _close_over_budget(
    websocket: WebSocket, session: Session, over: str, settings: Any
) -> None:
    session.ws_budget.closed_over()
    _note_over_budget(session, over)
    if over == "messages":
        reason = f"over the message budget: {settings.ws_messages_per_s:g} messages/s"
    else:
        reason = f"over the byte budget: {settings.ws_bytes_per_s} bytes/s"
    transport = _stop_reading(websocket)
    # a client that reads nothing would hold the close up (its socket is not writable)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code=1008, reason=reason), CLOSE_FLUSH_S)
    if transport is not None:
        asyncio.get_running_loop().call_later(CLOSE_FLUSH_S, transport.abort)


def _note_over_budget(session: Session, what: str) -> None:
    """One log line a second per session, however often a client comes back for more."""
    count = session.ws_budget.notice.hit(session.loop.time())
    if count:
        log.warning(
            "audio websocket over its message budget",
            extra={"session_id": session.id, "what": what, "times": count},
        )


def _stop_reading(websocket: WebSocket) -> Any:
    """Read nothing more from a socket about to be closed over budget; its transport (to be
    dropped once the close frame has had `CLOSE_FLUSH_S` to leave), or None.

    Sending a close frame, uvicorn resumes reading and reads (and parses) whatever the client
    sends until the client answers it, for up to 10 s, many reads per wake-up: a client that
    floods and ignores the close would keep the event loop parsing all that time. ASGI has no
    way to say "stop reading", so this goes to the server's transport through its receive
    callable (uvicorn's websocket protocols keep it as `transport`, and resume reading on close
    only where their `read_paused` says they paused it); under a server without these it does
    nothing.
    """
    protocol: Any = getattr(getattr(websocket, "_receive", None), "__self__", None)
    transport = getattr(protocol, "transport", None)
    if transport is None or not hasattr(transport, "pause_reading"):
        return None
    with contextlib.suppress(Exception):
        transport.pause_reading()
    if getattr(protocol, "read_paused", None) is True:
        protocol.read_paused = False  # paused for good: the close must not resume it
    return transport


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
