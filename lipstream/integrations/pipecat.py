"""lipstream as a Pipecat video service, written the way Pipecat's own video services
(`pipecat.services.simli.video`, `pipecat.services.tavus.video`) are.

Put it after the TTS service and before the output transport::

    avatar = LipstreamVideoService(base_url="http://localhost:8000", avatar_id="...")
    pipeline = Pipeline([..., tts, avatar, transport.output()])

In: `TTSAudioRawFrame` (any sample rate, mono or stereo) is resampled to 16 kHz mono and sent
to a lipstream session's audio websocket; `TTSStoppedFrame` sends `end`, `InterruptionFrame`
sends `clear`. Out: the session's WebRTC video as `OutputImageRawFrame` (RGB, 25 fps, the idle
loop while silent) and its audio as `SpeechOutputAudioRawFrame`s at the pipeline's output rate,
pushed as they arrive (the server sends both on one clock), so any Pipecat transport carries
the avatar. Audio is pushed only while the avatar speaks (silence between utterances is not),
so the output transport's bot-speaking detection works as with a TTS service.

Needs the `pipecat` extra: `pip install 'lipstream[pipecat]'`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

try:
    from pipecat.audio.utils import create_stream_resampler
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        SpeechOutputAudioRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "lipstream.integrations.pipecat needs Pipecat: pip install 'lipstream[pipecat]'"
    ) from exc

from lipstream.integrations.session_client import SessionClient

log = logging.getLogger(__name__)

SESSION_RATE = 16_000  # what a lipstream session's audio websocket takes
# after `clear`, received audio is dropped until the server says playback finished (or this
# long): the frames already in flight would otherwise play after the interruption
CLEAR_MUTE_S = 0.5
FLIGHT_S = 0.1  # how long received media may lag the websocket's events
SILENCE_PEAK = 16  # |sample| at or under this, outside an utterance, counts as silence
# aiortc holds received audio until 4 packets (20 ms each) are buffered and video not at all
# (its jitter buffers: prefetch=4 for audio, none for video): video is held this much longer
# so that both leave the service as they left the server, together
VIDEO_HOLD_S = 0.06


@dataclass
class LipstreamVideoSettings(ServiceSettings):
    """Settings for the lipstream video service (none at runtime yet)."""


class LipstreamVideoService(AIService):
    """A lipstream avatar as a Pipecat video service (see the module docstring)."""

    Settings = LipstreamVideoSettings
    _settings: LipstreamVideoSettings

    def __init__(
        self,
        *,
        base_url: str,
        avatar_id: str,
        api_key: str | None = None,
        settings: LipstreamVideoSettings | None = None,
        **kwargs: Any,
    ) -> None:
        """Args:
        base_url: the lipstream server, e.g. ``http://localhost:8000``.
        avatar_id: a ready avatar (``POST /v1/avatars``, or ``lipstream avatar add``).
        api_key: the server's API key, where it has one (sent as a bearer token).
        settings: service settings.
        **kwargs: passed to `AIService`.
        """
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if not avatar_id:
            raise ValueError("avatar_id must not be empty")
        default_settings = LipstreamVideoSettings(model=None)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(settings=default_settings, **kwargs)
        self._base_url = base_url
        self._avatar_id = avatar_id
        self._api_key = api_key
        self._client: SessionClient | None = None
        self._out_rate = 24_000
        self._in_resampler = create_stream_resampler()
        self._out_resampler = create_stream_resampler()
        self._playing = False
        self._muted_until = 0.0
        self._video: asyncio.Queue[tuple[float, OutputImageRawFrame]] = asyncio.Queue()
        self._video_task: asyncio.Task[None] | None = None

    @property
    def session_id(self) -> str | None:
        """The lipstream session's id while it is open."""
        return self._client.session_id if self._client is not None else None

    def can_generate_metrics(self) -> bool:
        return True

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)
        self._out_rate = int(setup.audio_out_sample_rate)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self._open()

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            await self._send_tts(frame)
        elif isinstance(frame, TTSStoppedFrame):
            await self._send_control("end")
        elif isinstance(frame, InterruptionFrame):
            self._in_resampler = create_stream_resampler()  # drop its buffered tail
            self._playing = False
            self._muted_until = time.monotonic() + CLEAR_MUTE_S
            await self._send_control("clear")
            self._drop_held_video()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    # -- to the session ------------------------------------------------------------------
    async def _open(self) -> None:
        if self._client is not None:
            return
        client = SessionClient(
            self._base_url,
            api_key=self._api_key,
            on_video=self._on_video,
            on_audio=self._on_audio,
            on_event=self._on_event,
        )
        self._client = client
        self._video_task = self.create_task(self._push_video(), name="lipstream-video")
        try:
            await client.open(self._avatar_id)
        except Exception as exc:
            await self._close()
            await self.push_error(error_msg=f"lipstream session failed: {exc}", exception=exc)

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        task, self._video_task = self._video_task, None
        if task is not None:
            await self.cancel_task(task)
        self._video = asyncio.Queue()

    async def _send_tts(self, frame: TTSAudioRawFrame) -> None:
        if self._client is None:
            return
        pcm = np.frombuffer(frame.audio, dtype="<i2")
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype("<i2")
        data = await self._in_resampler.resample(pcm.tobytes(), frame.sample_rate, SESSION_RATE)
        try:
            await self._client.send_pcm(data)
        except Exception as exc:
            await self.push_error(error_msg=f"lipstream audio send failed: {exc}", exception=exc)

    async def _send_control(self, kind: str) -> None:
        if self._client is None:
            return
        try:
            await self._client.send_control(kind)
        except Exception as exc:
            await self.push_error(error_msg=f"lipstream {kind} failed: {exc}", exception=exc)

    # -- from the session ----------------------------------------------------------------
    async def _on_video(self, frame: av.VideoFrame) -> None:
        rgb = frame.to_ndarray(format="rgb24")
        image = OutputImageRawFrame(
            image=rgb.tobytes(), size=(frame.width, frame.height), format="RGB"
        )
        self._video.put_nowait((time.monotonic() + VIDEO_HOLD_S, image))

    def _drop_held_video(self) -> None:
        """Frames still held were made before the interruption: they are not shown."""
        while not self._video.empty():
            self._video.get_nowait()

    async def _push_video(self) -> None:
        while True:
            due, image = await self._video.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.push_frame(image)

    async def _on_audio(self, mono: np.ndarray, rate: int) -> None:
        if time.monotonic() < self._muted_until:
            return
        if not self._playing and int(np.abs(mono.astype(np.int32)).max(initial=0)) <= SILENCE_PEAK:
            return
        data = await self._out_resampler.resample(mono.tobytes(), rate, self._out_rate)
        if data:
            await self.push_frame(
                SpeechOutputAudioRawFrame(audio=data, sample_rate=self._out_rate, num_channels=1)
            )

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "playback_started":
            self._playing = True
            self._muted_until = 0.0
        elif kind == "playback_finished":
            self._playing = False
            # what is still in the jitter buffer was sent before the clear
            self._muted_until = min(self._muted_until, time.monotonic() + FLIGHT_S)
        log.debug("lipstream event", extra={"event": kind})
