"""lipstream as a LiveKit avatar worker: the VideoGenerator with LiveKit's own frame types, LiveKit's
own AvatarRunner driving it, the REST route that joins a room, and (where a `livekit-server`
binary exists) a whole room with an agent-side sender."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

rtc = pytest.importorskip("livekit.rtc", reason="the livekit extra is not installed")
avatar_api = pytest.importorskip(
    "livekit.agents.voice.avatar", reason="the livekit extra is not installed"
)

from bench.loopback import ServerThread, wait_first_avatar_ready  # noqa: E402
from engines.preview import PreviewEngine  # noqa: E402
from server.app import create_app  # noqa: E402
from server.integrations.livekit_worker import (  # noqa: E402
    RoomLink,
    RoomSession,
    SessionVideoGenerator,
)
from server.media.pictures import AvatarPictures, IdleFrames  # noqa: E402
from server.metrics import ServerMetrics  # noqa: E402
from server.session.worker import FrameWorker  # noqa: E402
from server.settings import Settings  # noqa: E402

# LiveKit's native runtime (its threads, eventfds and sockets: the process's for good), started
# now, at collection, before the first test's leak-check baseline
rtc.AudioResampler(48000, 16000, num_channels=1)

FAKE_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def tone(seconds: float, rate: int = 48000, channels: int = 2) -> list[Any]:
    """A 220 Hz tone as LiveKit AudioFrames of 20 ms (the agent side's usual framing)."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    mono = (0.4 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    data = np.repeat(mono[:, None], channels, axis=1)
    step = rate // 50
    return [
        rtc.AudioFrame(data[i : i + step].tobytes(), rate, channels, len(data[i : i + step]))
        for i in range(0, n, step)
    ]


class Generated:
    """A running SessionVideoGenerator over a real session, frame worker and preview engine;
    every item it yields is recorded with its arrival time."""

    def __init__(self, avatar: Any) -> None:
        engine = PreviewEngine()
        engine.load_avatar(avatar)
        self.worker = FrameWorker(engine)
        self.worker.start()
        self.session = RoomSession(
            avatar=avatar,
            pictures=AvatarPictures(avatar, engine, IdleFrames()),
            worker=self.worker,
            settings=Settings(engine="preview"),
            metrics=ServerMetrics(),
        )
        self.link = RoomLink(self.session.media_events(lambda state: None))
        self.session.media = self.link
        self.session.wanted = {"video", "audio"}
        self.events: list[dict[str, Any]] = []
        self.gen = SessionVideoGenerator(self.session, self.link, on_event=self.events.append)
        self.items: list[tuple[float, Any]] = []
        self.session.start()
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for item in self.gen:
            self.items.append((time.monotonic(), item))

    async def until(self, test: Any, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not test():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    def kinds(self, start: int = 0) -> str:
        """The items since `start` as a string: V video, A audio, E segment end."""
        names = {rtc.VideoFrame: "V", rtc.AudioFrame: "A"}
        return "".join(names.get(type(i), "E") for _, i in self.items[start:])

    async def close(self) -> None:
        await self.session.close("test")
        await asyncio.wait_for(self.task, 5)  # the iterator ends with the session
        self.worker.stop()


@pytest.fixture
async def generated(preview_avatar: Any) -> AsyncIterator[Generated]:
    g = Generated(preview_avatar)
    yield g
    await g.close()


async def test_frames_at_25_fps_idle_video_only_then_speech_with_its_audio(
    generated: Generated,
) -> None:
    g = generated
    await g.until(lambda: len(g.items) >= 12)
    assert set(g.kinds()) == {"V"}, "idle: video only, so the runner's position counts speech"
    first = g.items[0][1]
    assert isinstance(first, rtc.VideoFrame)
    assert first.type == rtc.VideoBufferType.I420
    assert (first.width, first.height) == (g.gen.width, g.gen.height)
    assert g.gen.options.video_fps == 25.0 and g.gen.options.audio_sample_rate == 16000

    start = len(g.items)
    for frame in tone(1.0):  # 48 kHz stereo in: resampled and mixed down to 16 kHz mono
        await g.gen.push_audio(frame)
    await g.gen.push_audio(avatar_api.AudioSegmentEnd())
    await g.until(lambda: "E" in g.kinds(start))
    kinds = g.kinds(start)
    speech = kinds[kinds.index("A") - 1 : kinds.index("E")]
    # every speaking tick is one video frame followed by its own 40 ms of audio
    assert set(speech[0::2]) == {"V"} and set(speech[1::2]) == {"A"}
    audio = [i for _, i in g.items[start:] if isinstance(i, rtc.AudioFrame)]
    assert all(a.sample_rate == 16000 and a.num_channels == 1 for a in audio)
    assert all(a.samples_per_channel == 640 for a in audio)
    played = sum(a.samples_per_channel for a in audio) / 16000
    assert 0.96 <= played <= 1.08, played
    pcm = np.concatenate([np.frombuffer(a.data, dtype=np.int16) for a in audio]).astype(float)
    assert np.sqrt(np.mean(pcm[1600:-1600] ** 2)) > 0.2 * 32767, "the tone came back"
    [started] = [e for e in g.events if e["type"] == "playback_started"]
    [finished] = [e for e in g.events if e["type"] == "playback_finished"]
    assert finished["interrupted"] is False and finished["position"] == pytest.approx(played)
    # the clock: video frames 40 ms apart on average over the whole run
    video_t = [t for t, i in g.items if isinstance(i, rtc.VideoFrame)]
    fps = (len(video_t) - 1) / (video_t[-1] - video_t[0])
    assert 23.0 <= fps <= 27.0, fps
    assert started


async def test_back_to_back_utterances_are_two_segments_with_all_their_audio(
    generated: Generated,
) -> None:
    g = generated
    start = len(g.items)
    for _ in range(2):  # the second is queued while the first plays: no idle tick between
        for frame in tone(0.4, rate=16000, channels=1):
            await g.gen.push_audio(frame)
        await g.gen.push_audio(avatar_api.AudioSegmentEnd())
    await g.until(lambda: g.kinds(start).count("E") == 2)
    kinds = g.kinds(start)
    first, second = kinds.index("E"), kinds.rindex("E")
    assert kinds[:first].count("A") == 10 and kinds[first:second].count("A") == 10, kinds
    assert "AA" not in kinds, "each audio frame follows its own video frame"
    finished = [e for e in g.events if e["type"] == "playback_finished"]
    assert [e["interrupted"] for e in finished] == [False, False]


async def test_clear_buffer_returns_to_idle_within_two_frames(generated: Generated) -> None:
    g = generated
    for frame in tone(3.0):
        await g.gen.push_audio(frame)
    await g.until(lambda: "A" in g.kinds())
    await asyncio.sleep(0.2)
    g.gen.clear_buffer()
    at = len(g.items)
    await g.until(lambda: len(g.items) >= at + 12)
    after = g.kinds(at)
    assert "A" not in after[2:], f"audio after the clear: {after}"
    assert "E" not in after, "an interrupted segment is told by the runner, not by a segment end"
    [finished] = [e for e in g.events if e["type"] == "playback_finished"]
    assert finished["interrupted"] is True and 0.1 < finished["position"] < 3.0
    assert not g.session.playout.speaking


async def test_a_room_link_not_read_keeps_the_newest_two_seconds() -> None:
    from server.media.link import MediaEvents

    drops: list[int] = []
    link = RoomLink(MediaEvents(print, print, print), on_drop=lambda: drops.append(1))
    picture = np.zeros((6, 4), np.uint8)
    for k in range(60):
        link.send(k, picture + k, None)
        link.event({"type": "tick", "k": k})
    assert len(drops) == 10
    kept = [await link.take() for _ in range(10)]
    assert [e["k"] for e in kept] == list(range(10)), "events are state changes: all kept"
    first = await link.take()
    assert int(first.picture[0, 0]) == 10, "the oldest ticks went first"
    assert (await link.take())["k"] == 10, "a tick's events stay behind it"
    assert link.drop_ticks() == 49
    assert link.peek() == {"type": "tick", "k": 11}, "a clear keeps the events"
    await link.close()
    assert await link.take() is not None and link.state is None


class _Publication:
    async def wait_for_subscription(self) -> None:
        return None


class _LocalParticipant:
    def __init__(self) -> None:
        self.published: list[Any] = []

    async def publish_track(self, track: Any, options: Any) -> _Publication:
        self.published.append(track)
        return _Publication()


class _ConnectedRoom(rtc.EventEmitter):  # type: ignore[misc,name-defined]
    """The one part not real here: a room that is connected and accepts the two tracks."""

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = _LocalParticipant()

    def isconnected(self) -> bool:
        return True


async def test_avatar_runner_reports_playback_to_the_agent_output(generated: Generated) -> None:
    """LiveKit's own AvatarRunner over our generator, with LiveKit's QueueAudioOutput as the
    agent's audio output: playback finished after a segment, and interrupted after a clear."""
    g = generated
    g.task.cancel()  # the runner consumes the generator instead
    await asyncio.gather(g.task, return_exceptions=True)
    g.task = asyncio.create_task(asyncio.sleep(0))
    output = avatar_api.QueueAudioOutput(sample_rate=24000)
    finished: list[Any] = []
    output.on("playback_finished", finished.append)
    room = _ConnectedRoom()
    runner = avatar_api.AvatarRunner(
        room, audio_recv=output, video_gen=g.gen, options=g.gen.options
    )
    await runner.start()
    try:
        for frame in tone(0.6, rate=24000, channels=1):
            await output.capture_frame(frame)
        output.flush()
        await g.until(lambda: bool(finished))
        assert finished[0].interrupted is False
        assert finished[0].playback_position == pytest.approx(0.6, abs=0.09)
        assert len(room.local_participant.published) == 2  # audio and video, on first frame
        before = len(g.events)
        for frame in tone(3.0, rate=24000, channels=1):
            await output.capture_frame(frame)
        output.flush()
        await g.until(lambda: any(e["type"] == "playback_started" for e in g.events[before:]))
        await asyncio.sleep(0.3)
        output.clear_buffer()
        await g.until(lambda: len(finished) >= 2)
        assert len(finished) == 2 and finished[1].interrupted is True
        assert 0.1 < finished[1].playback_position < 3.0
    finally:
        await runner.aclose()


# -- the REST route ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    settings = Settings(
        engine="preview", avatars_dir=tmp_path_factory.mktemp("lk") / "avatars", demo_avatar=True
    )
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    yield srv, wait_first_avatar_ready(srv.base_url)
    srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"url": "ws://127.0.0.1:7880", "token": FAKE_JWT}, "avatar_id"),
        ({"avatar_id": "x", "url": "ftp://host", "token": FAKE_JWT}, "url must be"),
        ({"avatar_id": "x", "url": "ws://a b", "token": FAKE_JWT}, "url must be"),
        ({"avatar_id": "x", "url": 7, "token": FAKE_JWT}, "url must be"),
        ({"avatar_id": "x", "url": "ws://127.0.0.1:7880", "token": "not a jwt"}, "token must be"),
        ({"avatar_id": "x", "url": "ws://127.0.0.1:7880"}, "token must be"),
        ({"avatar_id": "x", "url": "wss://h", "token": "a.b.c" + "d" * 9000}, "token must be"),
    ],
)
def test_a_malformed_join_is_a_400_saying_which_field(
    server: tuple[ServerThread, str], body: dict[str, Any], says: str
) -> None:
    srv, _ = server
    r = httpx.post(f"{srv.base_url}/v1/livekit/sessions", json=body, timeout=10)
    assert r.status_code == 400 and says in r.json()["detail"], r.text
    r = httpx.post(f"{srv.base_url}/v1/livekit/sessions", content=b"{nope", timeout=10)
    assert r.status_code == 400


def test_an_unknown_avatar_is_a_404(server: tuple[ServerThread, str]) -> None:
    srv, _ = server
    body = {"avatar_id": "av_nope", "url": f"ws://127.0.0.1:{free_port()}", "token": FAKE_JWT}
    r = httpx.post(f"{srv.base_url}/v1/livekit/sessions", json=body, timeout=10)
    assert r.status_code == 404, r.text


def test_an_unreachable_room_fails_cleanly_and_leaves_no_session(
    server: tuple[ServerThread, str], caplog: pytest.LogCaptureFixture
) -> None:
    srv, avatar_id = server
    before = dict(srv.app.state.sessions.sessions)
    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    body = {"avatar_id": avatar_id, "url": url, "token": FAKE_JWT}
    r = httpx.post(f"{srv.base_url}/v1/livekit/sessions", json=body, timeout=30)
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert "could not join the LiveKit room" in detail and url in detail, detail
    assert time.monotonic() - t0 < 12
    assert srv.app.state.sessions.sessions == before
    assert srv.app.state.sessions._opening == 0  # the slot was given back
    ours = [r for r in caplog.records if r.name.startswith("server") and r.levelname == "ERROR"]
    assert not ours, "closed without errors (LiveKit's own log says why it could not connect)"


def test_without_the_livekit_packages_the_route_says_501(
    server: tuple[ServerThread, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.api.livekit as route

    srv, avatar_id = server
    monkeypatch.setattr(route, "livekit_room", None)
    body = {"avatar_id": avatar_id, "url": "ws://127.0.0.1:1", "token": FAKE_JWT}
    r = httpx.post(f"{srv.base_url}/v1/livekit/sessions", json=body, timeout=10)
    assert r.status_code == 501 and "lipstream[livekit]" in r.json()["detail"]


# -- the agent side and the command -----------------------------------------------------


def test_the_worker_token_joins_the_room_as_an_agent_publishing_for_the_agent() -> None:
    from livekit import api
    from livekit.agents.voice.room_io import ATTRIBUTE_PUBLISH_ON_BEHALF

    from lipstream.integrations.livekit import LipstreamError, LiveKitCredentials, worker_token

    creds = LiveKitCredentials("ws://127.0.0.1:7880", "devkey", "secret" * 6)
    jwt = worker_token(creds, "room-1", "lipstream-avatar", "agent-7")
    claims = api.TokenVerifier("devkey", "secret" * 6).verify(jwt)
    assert claims.identity == "lipstream-avatar" and claims.kind == "agent"
    assert claims.video is not None and claims.video.room == "room-1" and claims.video.room_join
    assert claims.video.can_publish and claims.video.can_publish_data
    assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-7"}
    with pytest.raises(LipstreamError, match="api secret"):
        LiveKitCredentials("ws://127.0.0.1:7880", "devkey", "")
    with pytest.raises(LipstreamError, match="ws"):
        LiveKitCredentials("ftp://h", "devkey", "s")


async def test_request_join_passes_the_servers_refusal_on(
    server: tuple[ServerThread, str],
) -> None:
    from lipstream.integrations.livekit import AvatarSession, LipstreamError, request_join

    srv, _ = server
    with pytest.raises(LipstreamError, match=r"answered 404: .*av_nope"):
        await request_join(srv.base_url, "av_nope", "ws://127.0.0.1:1", FAKE_JWT)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LipstreamError, match="could not reach the lipstream server"):
        await request_join(nobody, "av_x", "ws://127.0.0.1:1", FAKE_JWT)
    with pytest.raises(LipstreamError, match="base_url"):
        AvatarSession("ws://wrong", "av_x")
    avatar = AvatarSession(srv.base_url, "av_x")
    assert avatar.avatar_identity == "lipstream-avatar" and avatar.provider == "lipstream"


def test_livekit_join_command_says_why_the_room_could_not_be_joined(
    server: tuple[ServerThread, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from lipstream.commands.livekit import livekit_app

    srv, avatar_id = server
    monkeypatch.setenv("LIVEKIT_API_KEY", "devkey")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "secret" * 6)
    lk = f"ws://127.0.0.1:{free_port()}"
    args = ["join", "--avatar", avatar_id, "--room", "r", "--url", lk]
    result = CliRunner().invoke(livekit_app, [*args, "--server", srv.base_url])
    assert result.exit_code == 1
    assert "could not join the LiveKit room" in result.output, result.output
    result = CliRunner().invoke(livekit_app, [*args, "--token", FAKE_JWT, "--server", srv.base_url])
    assert result.exit_code == 2 and "exactly one of --room and --token" in result.output
    assert srv.app.state.sessions.sessions == {}


# -- a whole room (only where a LiveKit server can run) ----------------------------------

LIVEKIT_SERVER = shutil.which("livekit-server")


@pytest.mark.skipif(
    LIVEKIT_SERVER is None, reason="no livekit-server binary on PATH: the room test did not run"
)
async def test_an_agent_speaks_through_the_avatar_in_a_real_room(
    server: tuple[ServerThread, str], tmp_path: Path
) -> None:
    from livekit import api
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from lipstream.integrations.livekit import LiveKitCredentials, request_join, worker_token

    srv, avatar_id = server
    port = free_port()
    log = (tmp_path / "livekit.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220
        [str(LIVEKIT_SERVER), "--dev", "--bind", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    room = rtc.Room()
    try:
        creds = LiveKitCredentials(f"ws://127.0.0.1:{port}", "devkey", "secret")
        agent_jwt = (
            api.AccessToken("devkey", "secret")
            .with_kind("agent")
            .with_identity("agent")
            .with_grants(api.VideoGrants(room_join=True, room="lk-e2e"))
            .to_jwt()
        )
        for _ in range(100):  # the server takes a moment to listen
            try:
                await room.connect(creds.url, agent_jwt)
                break
            except rtc.ConnectError:
                await asyncio.sleep(0.1)
        assert room.isconnected()
        jwt = worker_token(creds, "lk-e2e", "lipstream-avatar", "agent")
        answer = await request_join(srv.base_url, avatar_id, creds.url, jwt)
        output = DataStreamAudioOutput(
            room, destination_identity="lipstream-avatar", sample_rate=16000
        )
        finished: list[Any] = []
        output.on("playback_finished", finished.append)
        for frame in tone(1.0, rate=16000, channels=1):
            await output.capture_frame(frame)
        output.flush()
        deadline = time.monotonic() + 15
        while not finished and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert finished and finished[0].interrupted is False
        assert finished[0].playback_position == pytest.approx(1.0, abs=0.1)
        published = [
            p
            for participant in room.remote_participants.values()
            for p in participant.track_publications.values()
        ]
        assert {p.kind for p in published} >= {rtc.TrackKind.KIND_VIDEO, rtc.TrackKind.KIND_AUDIO}
        await room.disconnect()  # the agent leaves: the avatar's session ends and it leaves too
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
            for _ in range(100):
                r = await http.get(f"/v1/sessions/{answer['session_id']}")
                if r.status_code == 404:
                    break
                await asyncio.sleep(0.1)
        assert r.status_code == 404, "the session ended when the agent left"
    finally:
        await room.disconnect()
        proc.terminate()
        proc.wait(10)
        log.close()
