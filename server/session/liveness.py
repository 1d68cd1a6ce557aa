"""Is the peer still there? A connected WebRTC client that vanished (its process killed, its
network gone) says nothing: aiortc only notices when ICE consent expires, about 30 s later.

A live receiver sends RTCP (receiver reports, about once a second in browsers and aiortc) back
over the DTLS transport, so the transport's received-packet count keeps growing. `PeerWatch`
notes when it last grew; the session manager's reaper ends a connected session whose peer has
been silent for `peer_silence_s` (reason `peer_silent`).
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class PacketSource(Protocol):
    """What PeerWatch reads: a session's media link (in process or in a media process)."""

    async def packets_received(self) -> int: ...


class PeerWatch:
    """When the peer last sent us anything (loop time), fed by `update`."""

    def __init__(self) -> None:
        self.packets = -1
        self.last_heard: float | None = None

    async def update(self, media: PacketSource, now: float) -> float:
        """Read the counters of `media` (a `MediaLink`); returns seconds since the peer was
        last heard."""
        try:
            n = await media.packets_received()
        except Exception:  # a closing peer connection: the caller ends it anyway
            log.debug("peer stats unavailable", exc_info=True)
            n = self.packets
        if self.last_heard is None or n > self.packets:
            self.packets = n
            self.last_heard = now
        return now - self.last_heard
