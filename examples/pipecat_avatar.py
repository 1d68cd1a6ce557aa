"""A Pipecat pipeline that speaks a WAV file through a lipstream avatar into Pipecat's
SmallWebRTC transport, to watch in a browser.

    pip install 'lipstream[pipecat]' 'pipecat-ai[webrtc,runner]'
    lipstream serve                                  # in another terminal
    lipstream avatar add face.mp4                     # prints the avatar id
    LIPSTREAM_AVATAR_ID=<id> LIPSTREAM_WAV=speech.wav python examples/pipecat_avatar.py
    # open http://localhost:7860 and press Connect

Settings come from the environment: LIPSTREAM_URL (default http://localhost:8000),
LIPSTREAM_AVATAR_ID, LIPSTREAM_API_KEY (where the server has one), LIPSTREAM_WAV (PCM16 WAV,
any rate; mono or stereo). The file plays, as a TTS service's audio would, each time a browser
connects; a real agent puts its STT, LLM and TTS services before the avatar instead.
"""

from __future__ import annotations

import asyncio
import os
import wave

import httpx
from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.runner.types import RunnerArguments, SmallWebRTCRunnerArguments
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from lipstream.integrations.pipecat import LipstreamVideoService

BASE_URL = os.environ.get("LIPSTREAM_URL", "http://localhost:8000")
API_KEY = os.environ.get("LIPSTREAM_API_KEY") or None
CHUNK_S = 0.02


def read_wav(path: str) -> tuple[bytes, int, int]:
    """(PCM16 bytes, sample rate, channels)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise SystemExit(f"{path}: 16-bit PCM WAV expected")
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


def avatar_size(avatar_id: str) -> tuple[int, int]:
    """(width, height) of the avatar's frames, from the server."""
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    r = httpx.get(f"{BASE_URL}/v1/avatars/{avatar_id}", headers=headers)
    r.raise_for_status()
    info = r.json()
    if info["status"] != "ready":
        raise SystemExit(f"avatar {avatar_id} is {info['status']}: {info.get('error')}")
    height, width = info["size"]
    return int(width), int(height)


async def speak(worker: PipelineWorker, pcm: bytes, rate: int, channels: int) -> None:
    """Queue the WAV as TTS audio, 20 ms a frame, at real-time pace."""
    step = int(CHUNK_S * rate) * 2 * channels
    await worker.queue_frame(TTSStartedFrame())
    for i in range(0, len(pcm), step):
        await worker.queue_frame(
            TTSAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=channels)
        )
        await asyncio.sleep(CHUNK_S)
    await worker.queue_frame(TTSStoppedFrame())


async def bot(runner_args: RunnerArguments) -> None:
    if not isinstance(runner_args, SmallWebRTCRunnerArguments):
        raise SystemExit("this example runs on the SmallWebRTC transport: -t webrtc")
    avatar_id = os.environ["LIPSTREAM_AVATAR_ID"]
    pcm, rate, channels = read_wav(os.environ["LIPSTREAM_WAV"])
    width, height = avatar_size(avatar_id)
    transport = SmallWebRTCTransport(
        webrtc_connection=runner_args.webrtc_connection,
        params=TransportParams(
            audio_out_enabled=True,
            video_out_enabled=True,
            video_out_is_live=True,
            video_out_width=width,
            video_out_height=height,
            video_out_framerate=25,
        ),
    )
    avatar = LipstreamVideoService(base_url=BASE_URL, avatar_id=avatar_id, api_key=API_KEY)
    worker = PipelineWorker(
        Pipeline([transport.input(), avatar, transport.output()]),
        params=PipelineParams(audio_out_sample_rate=48_000),
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(_transport: SmallWebRTCTransport, _client: object) -> None:
        await asyncio.sleep(1.0)  # let the browser's player start
        await speak(worker, pcm, rate, channels)

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: SmallWebRTCTransport, _client: object) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
