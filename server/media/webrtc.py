"""WebRTC offer/answer with aiortc, defensively.

`setRemoteDescription` on a mutated offer raises many exception types, and `pc.close()` itself
may raise afterwards (CONVENTIONS.md): every failure here becomes `OfferError` (-> 400), and
closing a peer connection never raises. `packets_received` counts what the peer has sent us
(the session's liveness check reads it through its media link).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from server.media import encoder_watch, ice_ports
from server.settings import Settings, port_range

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
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
    servers = [
        RTCIceServer(urls=url, username=settings.ice_username, credential=settings.ice_credential)
        if url.startswith(("turn:", "turns:"))
        else RTCIceServer(urls=url)
        for url in settings.ice_servers
    ]
    # encodes timed; the bitrate policy or not; the codecs' threads, speed, denoiser, preset
    encoder_watch.install(settings.steady_bitrate, settings.encoder_tuning())
    ice_ports.apply(port_range(settings.ice_port_range))  # host candidates' UDP ports
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


async def packets_received(pc: RTCPeerConnection) -> int:
    """Packets the peer's DTLS transports have received so far (RTP, RTCP, DTLS)."""
    report = await pc.getStats()
    return sum(
        int(getattr(s, "packetsReceived", 0) or 0)
        for s in report.values()
        if getattr(s, "type", None) == "transport"
    )


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer connection; never raises, and frees its sockets and tasks even where
    aiortc's own `close()` fails half-way (after a refused offer a transceiver may have no
    transport: `close()` then raises and leaves the remaining transports running).

    aiortc connects in a background task (`__connect`) that `close()` does not stop: a close
    while it runs lets it start senders and ICE consent checks on the closed connection
    afterwards, which then run on (holding the session) until consent fails. That task is
    cancelled first."""
    await _cancel_connect(pc)
    try:
        await asyncio.wait_for(pc.close(), CLOSE_TIMEOUT_S)
        return
    except Exception as exc:
        log.info("peer connection close failed, forcing", extra={"error": type(exc).__name__})
    await _force_close(pc)


_CONNECT_CODE = getattr(RTCPeerConnection, "_RTCPeerConnection__connect", None)


async def _cancel_connect(pc: RTCPeerConnection) -> None:
    """Cancel and await `pc`'s connecting task(s), if any are running."""
    code = getattr(_CONNECT_CODE, "__code__", None)
    if code is None:
        return
    tasks = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if (
            getattr(coro, "cr_code", None) is code
            and frame is not None
            and frame.f_locals.get("self") is pc
            and not task.done()
        ):
            task.cancel()
            tasks.append(task)
    if tasks:
        await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)


async def _force_close(pc: RTCPeerConnection) -> None:
    """Stop what `pc.close()` would have stopped, each step on its own."""
    steps: list[Callable[[], Awaitable[Any]]] = []
    for transceiver in pc.getTransceivers():
        steps.append(transceiver.stop)
        dtls = transceiver.receiver.transport
        if dtls is not None:
            steps += [dtls.stop, dtls.transport.stop]
    sctp = pc.sctp
    if sctp is not None:
        steps += [sctp.stop, sctp.transport.stop, sctp.transport.transport.stop]
    for step in steps:
        try:
            await asyncio.wait_for(step(), CLOSE_TIMEOUT_S)
        except Exception as exc:
            log.debug("forced close step failed", extra={"error": type(exc).__name__})
    # aiortc's close() marked the connection closing before it failed: finish its bookkeeping
    # so the states read "closed" and a later close() returns at once
    closing = getattr(pc, "_RTCPeerConnection__isClosed", None)
    for name in ("IceGatheringState", "IceConnectionState", "ConnectionState"):
        update = getattr(pc, f"_RTCPeerConnection__update{name}", None)
        if callable(update) and closing:
            with contextlib.suppress(Exception):
                update()
    if isinstance(closing, asyncio.Future) and not closing.done():
        closing.set_result(True)
    pc.remove_all_listeners()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
