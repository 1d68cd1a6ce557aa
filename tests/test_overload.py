"""Overload admission (`server.session.overload`): while the engine makes too many speaking frames too
late, a new session is refused with 503 + Retry-After, and the sessions already open go on.

The end-to-end test runs a real server on loopback with a real aiortc peer and speech over the
real websocket; its engine is the preview engine slowed to 20 frames a second on purpose (a
stand-in for a GPU with more sessions than it can serve, which CI does not have)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.loopback import LoopbackClient, ServerThread, SessionRefused, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.metrics import ServerMetrics
from server.session.manager import SessionLimitError, SessionManager
from server.session.overload import LateFrames
from server.settings import Settings, SettingsError


def test_the_fraction_counts_late_against_speaking_ticks_in_the_window() -> None:
    w = LateFrames(window_s=10, min_ticks=100)
    for k in range(95):
        w.tick(100.0 + k * 0.04, speaking=True, late=False)
    assert w.fraction(104.0) is None  # too few ticks to judge
    for k in range(5):
        w.tick(104.0 + k * 0.04, speaking=False, late=True)
    w.tick(104.3, speaking=False, late=False)  # an idle tick: not counted
    assert w.fraction(104.5) == pytest.approx(0.05)
    assert w.over(104.5, 0.02) and not w.over(104.5, 0.1)
    assert not w.over(104.5, 0.0)  # 0: the check is off
    assert w.fraction(115.0) is None  # all of it left the window


def test_the_drop_fraction_counts_dropped_against_all_video_frames() -> None:
    """Frames dropped before the encoders against every tick of every session's clock, idle
    ones included, leaving out the session that dropped most; either fraction over the limit
    refuses."""
    w = LateFrames(window_s=10, min_ticks=100)
    for k in range(50):
        for sid in "abcd":  # idle ticks: video all the same
            w.tick(100.0 + k * 0.04, speaking=False, late=False, session=sid)
    assert w.fraction(102.5) is None  # no speaking frames to judge the engine by
    assert w.drop_fraction(102.5) == 0.0 and w.why(102.5, 0.02) is None
    for sid in "abc":  # the host behind: every session drops
        for k in range(3):
            w.dropped(101.0 + k * 0.04, sid)
    # 6 of the other sessions' 150 frames (one session's 3 left out)
    assert w.drop_fraction(102.5) == pytest.approx(0.04)
    assert w.why(102.5, 0.02) == "dropped" and w.over(102.5, 0.02)
    assert w.why(102.5, 0.1) is None and w.why(102.5, 0.0) is None  # under; off
    assert w.drop_fraction(115.0) is None  # all of it left the window


def test_one_session_dropping_frames_does_not_refuse_everyone() -> None:
    """A peer that stopped reading (or one oversized avatar) drops its own frames: that is
    not the host falling behind."""
    w = LateFrames(window_s=10, min_ticks=100)
    for k in range(50):
        for sid in "abcd":
            w.tick(100.0 + k * 0.04, speaking=True, late=False, session=sid)
        w.dropped(100.0 + k * 0.04, "d")  # every one of d's frames
    assert w.drop_fraction(102.5) == 0.0 and w.why(102.5, 0.02) is None
    lone = LateFrames(window_s=10, min_ticks=100)  # a lone session: nothing to compare with
    for k in range(200):
        lone.tick(100.0 + k * 0.04, speaking=True, late=False, session="a")
        lone.dropped(100.0 + k * 0.04, "a")
    assert lone.drop_fraction(108.5) is None


def test_window_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="window_s"):
        LateFrames(window_s=0)
    with pytest.raises(ValueError, match="min_ticks"):
        LateFrames(min_ticks=0)


def test_admit_max_late_auto_is_on_for_the_gpu_only() -> None:
    s = Settings()
    assert s.admit_max_late == -1.0
    assert s.admit_late_limit(gpu=True) == 0.02 and s.admit_late_limit(gpu=False) == 0.0
    assert Settings(admit_max_late=0.1).admit_late_limit(gpu=False) == 0.1
    assert Settings.from_env({"LIPSTREAM_ADMIT_MAX_LATE": "0"}).admit_late_limit(gpu=True) == 0
    for bad in (-0.5, 1.5):
        with pytest.raises(SettingsError, match="admit_max_late"):
            Settings(admit_max_late=bad)


async def test_the_manager_refuses_a_session_while_frames_come_late() -> None:
    metrics = ServerMetrics()
    manager = SessionManager(Settings(), metrics, late_limit=0.02)
    manager.late = LateFrames(window_s=10, min_ticks=50)
    now = asyncio.get_running_loop().time()
    for k in range(100):
        manager.late.tick(now - 2 + k * 0.01, speaking=k % 10 != 0, late=k % 10 == 0)
    with pytest.raises(SessionLimitError, match="not keeping up") as err:
        async with manager.slot():
            pass
    assert err.value.retry_after == 5 and "10.0%" in str(err.value)
    assert err.value.reason == "overloaded"
    off = SessionManager(Settings(), metrics, late_limit=0.0)
    off.late = manager.late
    async with off.slot():  # the check off: admitted
        pass


async def test_the_manager_refuses_a_session_while_the_host_drops_frames() -> None:
    manager = SessionManager(Settings(), ServerMetrics(), late_limit=0.02)
    manager.late = LateFrames(window_s=10, min_ticks=50)
    now = asyncio.get_running_loop().time()
    for k in range(40):  # the engine on time, but 1 video frame in 20 dropped, everywhere
        for sid in "abc":
            manager.late.tick(now - 2 + k * 0.01, speaking=True, late=False, session=sid)
            if k % 20 == 0:
                manager.late.dropped(now - 2 + k * 0.01, sid)
    with pytest.raises(SessionLimitError, match="host is not keeping up") as err:
        async with manager.slot():
            pass
    assert err.value.reason == "overloaded" and "5.0%" in str(err.value)


class SlowPreview(PreviewEngine):
    """The preview engine at most 20 frames a second: real time needs 25."""

    def render(
        self, avatar_id: str, loop_positions: Sequence[int], features: np.ndarray
    ) -> np.ndarray:
        time.sleep(0.05 * len(loop_positions))
        return super().render(avatar_id, loop_positions, features)


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2")


def slow_server(tmp_path: Path) -> tuple[ServerThread, str]:
    """A real server on loopback whose engine is `SlowPreview`, overload check at 2 %, judging
    after ~2 s of speech (not 10); with its demo avatar's id."""
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=True,
        admit_max_late=0.02,
        connect_timeout_s=120.0,
    )
    srv = ServerThread(create_app(settings, engine=SlowPreview(), reason="test")).start()
    try:
        avatar = wait_first_avatar_ready(srv.base_url)
    except BaseException:
        srv.stop()
        raise
    srv.app.state.sessions.late = LateFrames(window_s=10, min_ticks=40)
    return srv, avatar


async def test_a_slow_engine_refuses_new_sessions_and_keeps_the_open_one(tmp_path: Path) -> None:
    srv, avatar = slow_server(tmp_path)
    try:
        first = LoopbackClient(srv.base_url)
        await first.open(avatar)
        await first.connect_audio()
        await first.wait_frames(5)
        await first.send_pcm(speech(4.0))
        await asyncio.sleep(1.5)  # the gauge is set once a second
        second = LoopbackClient(srv.base_url)
        with pytest.raises(SessionRefused, match=r"503.*not keeping up") as refused:
            await second.open(avatar)
        assert refused.value.status == 503 and refused.value.reason == "overloaded"
        assert refused.value.retry_after == "5" and "not keeping up" in refused.value.detail
        await second.close(delete=False)
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            info = (await c.get(f"/v1/sessions/{first.session['session_id']}")).json()
            metrics = (await c.get("/metrics")).text
            ready = (await c.get("/readyz")).json()
        assert ready["admit_max_late"] == 0.02 and ready["engine_late_fraction"] > 0.1
        # the refusal was the engine's: the encoder kept up on loopback (the other signal)
        assert "video_drop_fraction" in ready and (ready["video_drop_fraction"] or 0.0) <= 0.02
        assert info["state"] == "connected" and info["speech_frames"] > 20
        assert info["engine_late_frames"] > 0.1 * info["speech_frames"]
        assert 'lipstream_sessions_refused_total{reason="overloaded"} 1.0' in metrics
        (gauge,) = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("lipstream_engine_late_fraction ")
        ]
        assert gauge > 0.1  # 20 frames of every 25, at best
        frames = len(first.received.video)
        await first.wait_frames(frames + 10)  # the open session still gets its frames
        await first.close()
    finally:
        srv.stop()
