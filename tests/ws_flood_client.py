"""A hostile audio-websocket client, run as its own process by the flood tests.

`python tests/ws_flood_client.py WS_URL SECONDS` opens the websocket (a valid token in the URL)
and, for SECONDS, writes masked frames as fast as the server's socket takes them: 1-byte
binary messages, 2-byte PCM messages and short text that is not JSON, interleaved. It reads what
the server sends (so its own receive buffer never fills), notes close frames and keeps writing
after one (a hostile client does not honour the closing handshake); when the connection is gone
it opens a new one at once; a refused handshake is retried after `RETRY_S`. At the end it prints
one JSON line: connections, refusals, bytes and messages written, close codes seen, and how long
each connection lasted after its handshake.

Standard library only, so it starts in a few milliseconds and costs the test process nothing.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

RETRY_S = 0.1  # after a refused handshake
SEND_TIMEOUT_S = 0.2
MESSAGES = (b"\x82\x01", b"\x00"), (b"\x82\x02", b"\x01\x00"), (b"\x81\x07", b"#foo!?x")


def masked_frames(n_rounds: int) -> tuple[bytes, int, int]:
    """`n_rounds` of the three messages, masked as a client must: (bytes, messages, size)."""
    out = bytearray()
    for i in range(n_rounds):
        for header, payload in MESSAGES:
            mask = os.urandom(4) if i < 16 else out[2:6]  # a few masks are enough
            out += bytes([header[0], header[1] | 0x80]) + bytes(mask)
            out += bytes(b ^ mask[k % 4] for k, b in enumerate(payload))
    return bytes(out), n_rounds * len(MESSAGES), len(out)


def handshake(host: str, port: int, target: str) -> tuple[socket.socket | None, int]:
    """Open the websocket: (socket, 101) or (None, the HTTP status)."""
    sock = socket.create_connection((host, port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            return None, 0
        head += chunk
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        sock.close()
        return None, status
    sock.settimeout(SEND_TIMEOUT_S)
    return sock, status


class ServerFrames:
    """Reads the server's (unmasked) frames as they come and notes close codes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.close_codes: list[int] = []
        self.closed = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            opcode, n, at = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, at = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < at + n:
                return
            payload = bytes(self.buf[at : at + n])
            del self.buf[: at + n]
            if opcode == 0x8:
                self.closed = True
                self.close_codes.append(int.from_bytes(payload[:2], "big") if n >= 2 else 1005)


def drain(sock: socket.socket, frames: ServerFrames) -> bool:
    """Read whatever the server sent; False once the connection is gone."""
    while select.select([sock], [], [], 0)[0]:
        try:
            data = sock.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        frames.feed(data)
    return True


def flood(url: str, seconds: float) -> dict[str, Any]:
    parts = urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    blob, per_blob, blob_size = masked_frames(4096)
    stats: dict[str, Any] = {
        "connections": 0,
        "refused": 0,
        "bytes": 0,
        "messages": 0,
        "close_codes": [],
        "lasted_s": [],
    }
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock, status = handshake(parts.hostname or "127.0.0.1", parts.port or 80, target)
        if sock is None:
            stats["refused"] += 1
            stats["refused_with"] = status
            time.sleep(RETRY_S)
            continue
        stats["connections"] += 1
        opened = time.monotonic()
        frames = ServerFrames()
        view, sent = memoryview(blob), 0
        try:
            while time.monotonic() < deadline and drain(sock, frames):
                try:
                    sent += sock.send(view[sent % blob_size :])
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            sock.close()
        stats["bytes"] += sent
        stats["messages"] += sent * per_blob // blob_size
        stats["close_codes"] += frames.close_codes
        stats["lasted_s"].append(round(time.monotonic() - opened, 3))
    return stats


if __name__ == "__main__":
    print(json.dumps(flood(sys.argv[1], float(sys.argv[2]))), flush=True)
