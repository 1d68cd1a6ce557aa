"""Connection limits under the HTTP parser: what no ASGI middleware can see.

uvicorn keeps a connection that never finishes its request headers, or trickles its body,
for ever, and takes every connection the kernel hands it. `ConnectionGuard` (one per server)
and `GuardedHttpProtocol` (uvicorn's httptools protocol with timers) bound that:

- headers: at most `max_header_bytes` (431 past it; uvicorn's parser sets no limit at all),
  complete within `header_timeout_s` of connecting (or of the request's first byte, on a
  kept-alive connection): else 408, closed (a connection that sent nothing: closed).
- body: a request body must arrive within `body_timeout_s`, extended by one second for every
  `body_min_rate` bytes received (so a large upload at a decent rate goes on, a trickle ends);
  else 408, closed. Time while the server itself is not reading (the app is behind) is not
  counted against the client.
- sending: a client that takes none of what is sent to it for `send_timeout_s` (the transport's
  buffer stays above its high-water mark) is disconnected.
- connections: at most `max_connections` open (HTTP and websockets). At the cap, the connection
  that has waited longest for a request (idle keep-alive, or headers still incomplete) is
  closed to make room; where there is none, the new connection gets 503 and is closed.

Every limit that bites logs one warning line per kind per 10 s (`server.ops.log_limit`).
`server.ops.ws_guard` is the websocket side; `bound(cls, guard)` gives each class counted by one
guard, for `uvicorn.Config(http=..., ws=...)`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.ops.log_limit import RateLimitedLog

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 27\r\nconnection: close\r\n\r\nthe request took too long.\n"
)
HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 32\r\nconnection: close\r\n\r\nthe request headers are too large\n"
)
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nretry-after: 5\r\nconnection: close\r\n\r\ntoo many connections\n"
)
LINGER_S = 1.0  # after an error answer, input is read and dropped this long before closing
FD_RESERVE = 256  # descriptors beside the connections: sessions' sockets, files, pipes


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits (times in seconds, sizes in bytes); `server.settings` has the defaults."""

    max_connections: int = 2048
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: int = 16 * 1024
    send_timeout_s: float = 30.0
    ws_max_send_buffer: int = 1024 * 1024
    ws_ping_rate: float = 2.0

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_header_bytes",
            "header_timeout_s",
            "body_timeout_s",
            "body_min_rate",
            "send_timeout_s",
            "ws_max_send_buffer",
            "ws_ping_rate",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class Guarded(Protocol):
    client: tuple[str, int] | None

    def evict(self) -> None: ...


class ConnectionGuard:
    """The open connections of one server, those waiting for a request (oldest first: the
    ones to close at the cap) and the limit warnings."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[Guarded] = set()
        self.waiting: OrderedDict[Guarded, None] = OrderedDict()
        self.log = RateLimitedLog(log)

    def admit(self, conn: Guarded) -> bool:
        """Count `conn` in; at the cap, close the longest-waiting connection first. False:
        none could be closed, `conn` is refused (and not counted)."""
        if len(self.open) >= self.limits.max_connections:
            if not self.waiting:
                self.warn(
                    "connection_refused", "connection limit reached: new connection refused", conn
                )
                return False
            oldest, _ = self.waiting.popitem(last=False)
            self.open.discard(oldest)
            self.warn(
                "connection_evicted", "connection limit reached: idle connection closed", oldest
            )
            oldest.evict()
        self.open.add(conn)
        return True

    def adopt(self, conn: Guarded) -> None:
        """Count `conn` in without a check (a connection upgraded to a websocket)."""
        self.open.add(conn)

    def waiting_for_request(self, conn: Guarded) -> None:
        if conn in self.open:
            self.waiting[conn] = None
            self.waiting.move_to_end(conn)

    def request_started(self, conn: Guarded) -> None:
        self.waiting.pop(conn, None)

    def release(self, conn: Guarded) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)

    def warn(self, kind: str, message: str, conn: Guarded, **fields: Any) -> None:
        client = f"{conn.client[0]}:{conn.client[1]}" if conn.client else ""
        self.log.warning(kind, message, {"client": client, **fields, "open": len(self.open)})


class SendStall:
    """Mixed in before a uvicorn protocol: a connection whose client stops reading (asyncio
    pauses writing once the transport's buffer is full) and is still paused after
    `send_timeout_s` is dropped, with a rate-limited warning (`stall_reason`)."""

    guard: ClassVar[ConnectionGuard]
    stall_reason: ClassVar[str] = "send_timeout"
    stall_message: ClassVar[str] = "client not reading: connection dropped"
    _stall: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._stall is None:
            loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
            self._stall = loop.call_later(self.guard.limits.send_timeout_s, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._cancel_stall()

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _send_stalled(self) -> None:
        self._stall = None
        self.guard.warn(self.stall_reason, self.stall_message, self)  # type: ignore[arg-type]
        self.transport.abort()  # type: ignore[attr-defined]


class GuardedHttpProtocol(SendStall, HttpToolsProtocol):
    """uvicorn's httptools protocol with the guard's timers and connection cap."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._in_headers = False  # a request has begun, its headers are not complete
        self._reading_headers = True  # bytes now are (the start of) a request's headers
        self._header_bytes = 0
        self._body_deadline = 0.0
        self._body_bytes = 0
        self._discarding = False  # answered with an error: input is dropped until the close

    # -- the connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self.guard.waiting_for_request(self)
        self._arm(self.guard.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._cancel_stall()
        self.guard.release(self)
        super().connection_lost(exc)

    def evict(self) -> None:
        self._cancel()
        self.transport.close()

    def handle_websocket_upgrade(self) -> None:
        self._cancel()
        self._cancel_stall()
        self.guard.release(self)  # the websocket protocol counts itself in
        super().handle_websocket_upgrade()

    # -- the request ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the header size cap and the parser's complaints rate-limited."""
        if self._discarding:
            return
        self._unset_keepalive_if_required()
        if self._reading_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.guard.warn("bad_request", "invalid HTTP request", self)
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._reading_headers and self._header_bytes > self.guard.limits.max_header_bytes:
            self.guard.warn(
                "header_size", "request headers too large", self, received=self._header_bytes
            )
            self._reject(HEADERS_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True  # still among the first to go at the cap until its headers are in
        if self._timer is None:
            self._arm(self.guard.limits.header_timeout_s, self._header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_headers = self._reading_headers = False
        self._header_bytes = 0
        self._cancel()
        self.guard.request_started(self)
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        limits = self.guard.limits
        self._body_bytes = 0
        self._body_deadline = time.monotonic() + limits.body_timeout_s
        self._arm(limits.body_timeout_s, self._body_check)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._body_bytes += len(body)
        self._body_deadline += len(body) / self.guard.limits.body_min_rate

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_headers = True  # whatever follows is the next request
        self._cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self.guard.waiting_for_request(self)

    # -- timers --------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        self._cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        timeout = self.guard.limits.header_timeout_s
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm(timeout, self._header_timeout)  # a pipelined request waits its turn
            return
        if self._in_headers:
            self.guard.warn(
                "header_timeout", "request headers not received in time", self, timeout_s=timeout
            )
            self._reject(REQUEST_TIMEOUT)
            return
        self.guard.warn(
            "idle_timeout", "connection sent no request in time", self, timeout_s=timeout
        )
        self.transport.close()

    def _body_check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = time.monotonic()
        if now < self._body_deadline:
            self._arm(self._body_deadline - now, self._body_check)
            return
        if self.flow.read_paused:  # the app is not reading: the server is behind, not the client
            self._body_deadline = now + self.guard.limits.body_timeout_s
            self._arm(self.guard.limits.body_timeout_s, self._body_check)
            return
        self.guard.warn(
            "body_timeout", "request body not received in time", self, received=self._body_bytes
        )
        self._reject(REQUEST_TIMEOUT)

    def _reject(self, answer: bytes) -> None:
        """Send `answer`, end the sending side, and close after `LINGER_S` of dropping input:
        closing with unread input would reset the connection, and the client lose the answer.
        A request the app is still on sees its client gone (it writes nothing more); where its
        answer has begun, the connection just closes."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._discarding = True
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._arm(LINGER_S, self.transport.close)


def bound(cls: type[asyncio.Protocol], guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """`cls` (`GuardedHttpProtocol`, `server.ops.ws_guard.GuardedWebSocketProtocol`) with its
    connections counted by `guard`: one guard per server, given to both."""
    return type(cls.__name__, (cls,), {"guard": guard})


def fit_fd_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open files (up to the hard limit) to hold
    `max_connections` and `FD_RESERVE` more; the connections that fit (fewer than asked where
    the hard limit is too low, said in a warning)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    want = max_connections + FD_RESERVE
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    fit = max(1, soft - FD_RESERVE)
    if fit < max_connections:
        log.warning(
            "open-file limit too low for max_connections: lowered",
            extra={"nofile": soft, "max_connections": fit, "asked": max_connections},
        )
        return fit
    return max_connections
