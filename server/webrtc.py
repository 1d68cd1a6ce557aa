"""WebRTC offer/answer with aiortc, defensively.

`setRemoteDescription` on a mutated offer raises many exception types, and `pc.close()` itself
may raise afterwards (CONVENTIONS.md): every failure here becomes `OfferError` (-> 400), and
closing a peer connection never raises.
"""

from __future__ import annotations

import logging
import re

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from server.settings import Settings

log = logging.getLogger(__name__)

_MLINE = re.compile(r"^m=(\w+)", re.MULTILINE)


class OfferError(ValueError):
    """The SDP offer cannot be answered; the message is safe to show to the client."""


def check_offer(sdp: object, settings: Settings) -> str:
    """Cheap checks before aiortc sees the offer: type, size, media lines."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise OfferError("sdp must be a non-empty string")
    if len(sdp.encode("utf-8", "surrogatepass")) > settings.max_sdp_bytes:
        raise OfferError(f"sdp is larger than {settings.max_sdp_bytes} bytes")
    kinds = _MLINE.findall(sdp)
    if not kinds:
        raise OfferError("sdp has no media lines")
    if len(kinds) > settings.max_sdp_media:
        raise OfferError(
            f"sdp has {len(kinds)} media lines, at most {settings.max_sdp_media} allowed"
        )
    if "video" not in kinds:
        raise OfferError("the offer must have a video media line (recvonly or sendrecv)")
    return sdp


def make_peer(settings: Settings) -> RTCPeerConnection:
    servers = [RTCIceServer(urls=url) for url in settings.ice_servers]
    return RTCPeerConnection(configuration=RTCConfiguration(iceServers=servers))


async def negotiate(
    pc: RTCPeerConnection, sdp: str, video: MediaStreamTrack, audio: MediaStreamTrack
) -> tuple[str, set[str]]:
    """Apply the offer, attach our tracks, return (answer SDP, kinds we send)."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:
        log.info("offer refused", extra={"error": type(exc).__name__})
        raise OfferError(f"the SDP offer could not be applied: {_short(exc)}") from None
    # aiortc keeps the offer's direction reversed (our side's view): we may send on a
    # transceiver the client offered as recvonly or sendrecv
    receivable = {
        t.kind
        for t in pc.getTransceivers()
        if getattr(t, "_offerDirection", "sendrecv") in ("sendonly", "sendrecv")
    }
    if "video" not in receivable:
        raise OfferError(
            "the offer does not receive video (direction must be recvonly or sendrecv)"
        )
    sending = {"video"}
    try:
        pc.addTrack(video)
        if "audio" in receivable:
            pc.addTrack(audio)
            sending.add("audio")
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:
        log.info("answer failed", extra={"error": type(exc).__name__})
        raise OfferError(f"no answer could be made for this offer: {_short(exc)}") from None
    local = pc.localDescription
    if local is None:
        raise OfferError("no answer could be made for this offer")
    return local.sdp, sending


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer connection; never raises."""
    try:
        await pc.close()
    except Exception:
        log.warning("closing a peer connection failed", exc_info=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
