"""The audio path loses nothing: a real uvicorn server (preview engine) on loopback and a real
aiortc client that records every RTP packet as it arrives and decodes the Opus audio.

One recorded session drives every check. Three utterances, each 200 ms of silence then a tone
(1000 ms at 440 Hz, 1020 ms at 1 kHz, 1039 ms at 3 kHz, a quarter of full scale), are sent
ahead of real time, each followed by `end`, and played back to back. The client keeps
- per RTP packet: its arrival time (monotonic, taken as the client's DTLS transport hands it
  to the receiver, before any jitter buffer), kind and RTP timestamp;
- the decoded audio (its first channel, 48 kHz) placed by its RTP timestamps.

Ticks on the wire: the session's clock starts once both tracks are pulled, so the first video
frame and the first audio packet are tick 0: video RTP timestamp (ts - ts0) / 3600 and audio
(ts - ts0) / 1920 (Opus's 48 kHz clock, 40 ms a tick, two 20 ms packets) give a packet's tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from scipy.signal import hilbert

from bench.loopback import LoopbackClient, ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

SR = 16_000
RX_SR = 48_000
AMPLITUDE = 0.25
LEAD_SILENCE_S = 0.2
TONES = ((1.000, 440.0), (1.020, 1000.0), (1.039, 3000.0))  # (seconds, Hz)
VIDEO_TICK = 3600  # 90 kHz RTP clock
AUDIO_TICK = 1920  # 48 kHz RTP clock
SKIP_TICKS = 10  # the connection's first moments (encoders starting, bitrate settling)


def utterance(seconds: float, freq: float) -> np.ndarray:
    """200 ms of silence, then the tone: int16 mono 16 kHz."""
    n = round(seconds * SR)
    t = np.arange(n) / SR
    tone = np.round(AMPLITUDE * 32768 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return np.concatenate([np.zeros(round(LEAD_SILENCE_S * SR), np.int16), tone])


@dataclass
class Recording:
    packets: list[tuple[float, str, int]] = field(default_factory=list)  # (arrival, kind, ts)
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    finished: int = 0


def _record_packets(receiver: Any, kind: str, rec: Recording) -> None:
    handle = receiver._handle_rtp_packet

    async def recorded(packet: Any, arrival_time_ms: int) -> None:
        rec.packets.append((time.monotonic(), kind, packet.timestamp))
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = recorded


def _watch_rtp(client: LoopbackClient, rec: Recording) -> None:
    """Record each RTP packet as the client's transport hands it to a receiver (the receivers
    are wrapped as their tracks appear, while the answer is applied: before any RTP)."""

    @client.pc.on("track")
    def on_track(track: Any) -> None:
        for receiver in client.pc.getReceivers():
            if receiver.track is track:
                _record_packets(receiver, track.kind, rec)


async def _drive(srv: ServerThread, avatar_id: str, rec: Recording) -> None:
    client = LoopbackClient(srv.base_url)
    _watch_rtp(client, rec)
    try:
        await client.open(avatar_id)
        await client.connect_audio()
        await client.wait_frames(15)
        start = time.monotonic()
        for seconds, freq in TONES:
            await client.send_pcm(utterance(seconds, freq), chunk=1600, realtime=False)
            await client.send_json({"type": "end"})
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            done = [
                e
                for t, e in client.received.events
                if t >= start and e.get("type") == "playback_finished"
            ]
            if len(done) >= len(TONES):
                break
            await asyncio.sleep(0.05)
        rec.finished = len(done)
        await asyncio.sleep(0.5)  # the last packets through the jitter buffer
    finally:
        rec.audio, _ = client.received.audio_track()
        await client.close()


@pytest.fixture(scope="module", params=[0, 1], ids=["in-process", "media-process"])
def recording(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Recording]:
    """The session's peer in the server's process, or in a media process (the audio crosses
    to it as the tick's 16 kHz samples and is framed there)."""
    from skimage.data import astronaut

    root = tmp_path_factory.mktemp("audio")
    settings = Settings(
        engine="preview",
        avatars_dir=root / "avatars",
        max_sessions=2,
        media_processes=request.param,
    )
    with ServerThread(create_app(settings, engine=PreviewEngine(), reason="audio test")) as srv:
        ok, png = cv2.imencode(".png", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
        assert ok
        r = httpx.post(
            srv.base_url + "/v1/avatars",
            files={"file": ("astronaut.png", png.tobytes(), "image/png")},
        )
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        deadline = time.monotonic() + 60
        while (status := httpx.get(f"{srv.base_url}/v1/avatars/{aid}").json()["status"]) not in (
            "ready",
            "failed",
        ) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == "ready"
        rec = Recording()
        asyncio.run(_drive(srv, aid, rec))
        yield rec


# -- analysis ---------------------------------------------------------------------------
def _first_arrivals(rec: Recording, kind: str, per_tick: int) -> dict[int, list[float]]:
    """Per tick: the first arrival of each of its distinct RTP timestamps, in order."""
    stamps = [(t, ts) for t, k, ts in rec.packets if k == kind]
    ts0 = stamps[0][1]
    seen: dict[int, float] = {}
    for t, ts in stamps:
        rel = (ts - ts0) % (1 << 32)
        seen.setdefault(rel, t)
    ticks: dict[int, list[float]] = {}
    for rel, t in sorted(seen.items()):
        ticks.setdefault(rel // per_tick, []).append(t)
    return ticks


def tick_offsets(rec: Recording) -> tuple[np.ndarray, np.ndarray]:
    """Per tick from SKIP_TICKS on: (first half - video, second half - video), in ms."""
    video = _first_arrivals(rec, "video", VIDEO_TICK)
    audio = _first_arrivals(rec, "audio", AUDIO_TICK)
    first, second = [], []
    for k in sorted(audio):
        if k < SKIP_TICKS or k not in video or len(audio[k]) != 2:
            continue
        first.append(1000 * (audio[k][0] - video[k][0]))
        second.append(1000 * (audio[k][1] - video[k][0]))
    return np.asarray(first), np.asarray(second)


def tone_segments(audio: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) sample ranges at 48 kHz where the received tone is above half its sent
    amplitude; gaps under 5 ms are bridged."""
    envelope = np.abs(hilbert(audio.astype(np.float64)))
    on = envelope > 0.5 * AMPLITUDE * 32768
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2], strict=True))
    merged: list[tuple[int, int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] < RX_SR // 200:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return [(a, b) for a, b in merged if b - a > RX_SR // 100]


# -- checks -----------------------------------------------------------------------------
def test_every_utterance_played(recording: Recording) -> None:
    assert recording.finished == len(TONES)


def test_both_halves_of_a_tick_leave_with_its_video(recording: Recording) -> None:
    """Each 20 ms audio packet arrives within 2 ms of its tick's video frame (its first RTP
    packet), as measured where the client reads it: the median over the session. The first
    half is the baseline for the tails: it always left with its video, so its spread is what
    the loaded machine adds to the measurement; the second half must not be later than that
    (a packet a tick late is ~39 ms late)."""
    first, second = tick_offsets(recording)
    assert first.size > 75, first.size
    summary = {
        "first_median_ms": round(float(np.median(first)), 2),
        "second_median_ms": round(float(np.median(second)), 2),
        "first_p90_ms": round(float(np.percentile(np.abs(first), 90)), 2),
        "second_p90_ms": round(float(np.percentile(np.abs(second), 90)), 2),
    }
    assert abs(summary["first_median_ms"]) <= 2.0, summary
    assert abs(summary["second_median_ms"]) <= 2.0, summary
    assert summary["second_p90_ms"] <= summary["first_p90_ms"] + 5.0, summary


def test_every_sample_before_end_is_played(recording: Recording) -> None:
    """A tone of 1000, 1020 or 1039 ms arrives whole (the last frame padded with silence)."""
    segments = tone_segments(recording.audio)
    lengths_ms = [1000 * (b - a) / RX_SR for a, b in segments]
    assert len(segments) == len(TONES), lengths_ms
    for (seconds, _), got in zip(TONES, lengths_ms, strict=True):
        assert abs(got - 1000 * seconds) <= 4.0, lengths_ms


def test_received_level_equals_sent_level(recording: Recording) -> None:
    """The tones' RMS level at the client equals what was sent, within 0.5 dB."""
    segments = tone_segments(recording.audio)
    assert len(segments) == len(TONES)
    sent_rms = AMPLITUDE * 32768 / np.sqrt(2)
    margin = RX_SR // 20
    levels = []
    for a, b in segments:
        part = recording.audio[a + margin : b - margin].astype(np.float64)
        levels.append(20 * np.log10(np.sqrt(np.mean(part**2)) / sent_rms))
    assert all(abs(db) <= 0.5 for db in levels), [round(db, 2) for db in levels]


def test_received_audio_has_no_clicks_between_ticks(recording: Recording) -> None:
    """The 440 Hz tone is as clean at tick boundaries as anywhere: the resampling to 48 kHz
    carries its filter state from one tick to the next."""
    a, b = tone_segments(recording.audio)[0]
    x = recording.audio[a + RX_SR // 20 : b - RX_SR // 20].astype(np.float64)
    t = np.arange(x.size) / RX_SR
    basis = np.stack([np.sin(2 * np.pi * 440 * t), np.cos(2 * np.pi * 440 * t)], axis=1)
    fit, *_ = np.linalg.lstsq(basis, x, rcond=None)
    residual = x - basis @ fit
    snr_db = 10 * np.log10(np.mean((basis @ fit) ** 2) / np.mean(residual**2))
    assert snr_db >= 35.0, snr_db
