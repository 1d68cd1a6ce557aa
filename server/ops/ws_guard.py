"""Websocket limits under the ASGI app: uvicorn's websockets (sans-I/O) protocol, bounded.

uvicorn answers every ping with a pong written straight to the transport, whether or not the
client reads: a client that floods pings and never reads grows the server's outgoing buffer
without limit (about 15 MB/s), and parsing the flood holds the event loop. Pings and pongs
never reach the app, so the bounds live here, in `GuardedWebSocketProtocol`:

- control frames (pings, pongs) from the client: a token bucket of `ws_ping_rate` a second,
  `PING_BURST` at once; past it the socket closes with 1008. A browser sends none, a websocket
  library one every few seconds.
- the outgoing buffer: past `ws_max_send_buffer` bytes not taken by the client, the
  connection is dropped at once; a buffer that stays above the transport's high-water mark for
  `send_timeout_s` drops it too (the app's sends wait on that mark, so a slow reader costs at
  most one message beyond it).
- incoming bytes are parsed `SLICE` bytes at a time and parsing stops as soon as the socket is
  closed, so one read of a flood (up to 256 KiB) is not parsed in full first.

The session behind the socket lives on (the client may reconnect); the limits that bite are
logged through the connection guard's rate-limited warnings (`server.ops.conn_guard`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

from server.ops.conn_guard import ConnectionGuard, SendStall

PING_BURST = 10
SLICE = 4096
POLICY_VIOLATION = 1008


class GuardedWebSocketProtocol(SendStall, WebSocketsSansIOProtocol):
    guard: ClassVar[ConnectionGuard]
    stall_reason: ClassVar[str] = "ws_send_timeout"
    stall_message: ClassVar[str] = "websocket client not reading: dropped"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens = float(PING_BURST)
        self._refilled = time.monotonic()
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard.adopt(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        self.guard.release(self)
        super().connection_lost(exc)

    def evict(self) -> None:  # never waiting for a request: the guard does not pick it
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            if self.transport.is_closing():
                return
            super().data_received(bytes(view[start : start + SLICE]))
        self._check_buffer()

    # -- control frames ------------------------------------------------------------------
    def handle_ping(self) -> None:
        if self._take_control():
            super().handle_ping()
            self._check_buffer()

    def handle_pong(self, event: Frame) -> None:
        if self._take_control():
            super().handle_pong(event)

    def _take_control(self) -> bool:
        """Whether one more control frame is within the budget; past it, the socket closes."""
        if self.close_sent or self.transport.is_closing():
            return False
        now = time.monotonic()
        rate = self.guard.limits.ws_ping_rate
        self._tokens = min(PING_BURST, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.guard.warn("ws_ping_flood", "websocket closed: too many pings", self, rate=rate)
        self.conn.data_to_send()  # the pongs already queued are not sent
        self.conn.fail(POLICY_VIOLATION, "too many pings")
        self.close_sent = True
        if self.transport.get_write_buffer_size() > 0:
            self.transport.abort()  # a client that reads nothing would hold the close for ever
        else:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
        return False

    # -- sending -------------------------------------------------------------------------
    def _check_buffer(self) -> None:
        if self.transport.is_closing():
            return
        size = self.transport.get_write_buffer_size()
        if size > self.guard.limits.ws_max_send_buffer:
            self.guard.warn(
                "ws_send_buffer", "websocket client not reading: dropped", self, buffered=size
            )
            self.transport.abort()
