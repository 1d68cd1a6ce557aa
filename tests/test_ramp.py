"""The admission ramp (`bench.ramp`) against a real server on loopback with real aiortc
peers: sessions are admitted one at a time until the engine falls behind, then refused with
503 and reason "overloaded"; the admitted ones go on receiving video."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from test_overload import slow_server

from bench.loopback import ServerThread, wait_first_avatar_ready
from bench.ramp import ramp
from bench.ramp_clients import _Child
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings


async def test_the_ramp_admits_until_the_engine_falls_behind(tmp_path: Path) -> None:
    # the preview engine slowed to 20 fps: no GPU on CI to overload, so one session does it
    srv, _ = slow_server(tmp_path)
    try:
        result = await ramp(
            srv.base_url, every_s=2.0, max_sessions=4, stop_after_refusals=1, hold_s=1.0
        )
    finally:
        srv.stop()
    attempts = result["attempts"]
    assert attempts[0]["status"] == 201 and attempts[0]["open_before"] == 0
    refused = [a for a in attempts if a["status"] != 201]
    assert refused, attempts
    assert refused[0]["status"] == 503 and refused[0]["reason"] == "overloaded"
    assert "not keeping up" in refused[0]["detail"] and refused[0]["retry_after"] == "5"
    assert result["stopped"] == "overloaded" and refused[0] is attempts[-1]
    assert result["first_refused_open"] >= 1 and result["refusal_reasons"] == {"overloaded": 1}
    assert result["admitted"] == len(result["per_session"]) == result["first_refused_open"]
    for s in result["per_session"]:
        assert s["video_frames"] > 10 and s["frame_interval_ms_p99"] is not None, s
        assert s["engine_late_frames"] > 0 and "error" not in s, s
    assert max(x["engine_late_fraction"] or 0 for x in result["readyz_samples"]) > 0.02
    # what the admitted sessions saw: an engine at 20 fps makes them hold ticks (80 ms
    # intervals at the client); how many of them reach a session's p99 depends on how long it
    # spoke, so the intervals are checked for their order only
    per = result["per_session"]
    assert result["speech_frames"] >= result["engine_late_frames"] > 0
    assert result["held_frames"] == sum(s["held_frames"] for s in per) > 0
    assert result["frames_missing_at_client"] == sum(s["frames_missing_at_client"] for s in per)
    worst = max(s["frame_interval_ms_p99"] for s in per)
    assert result["frame_interval_ms_p99_max"] == worst >= result["frame_interval_ms_p99_median"]
    # /readyz also reports the host's side (frames dropped before the encoders) once it judges
    assert any(x["video_drop_fraction"] is not None for x in result["readyz_samples"])


async def test_the_ramp_spreads_its_clients_over_processes(tmp_path: Path) -> None:
    """`client_processes=2`: each attempt goes to the child process holding the fewest
    sessions; the children receive the video and report their sessions at the end."""
    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars", demo_avatar=True)
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        wait_first_avatar_ready(srv.base_url)
        result = await ramp(
            srv.base_url, every_s=1.0, max_sessions=3, hold_s=2.0, client_processes=2
        )
        assert not srv.app.state.sessions.sessions  # the children closed their sessions
    finally:
        srv.stop()
    assert result["client_processes"] == 2 and result["stopped"] == "max_sessions"
    assert [a["status"] for a in result["attempts"]] == [201, 201, 201]
    assert [a["open_before"] for a in result["attempts"]] == [0, 1, 2]
    per = result["per_session"]
    assert result["admitted"] == len(per) == 3
    pids = [p["client_pid"] for p in per]
    assert os.getpid() not in pids and len(set(pids)) == 2  # 2 in one child, 1 in the other
    assert len({p["session_id"] for p in per}) == 3
    assert [p["opened_at_s"] for p in per] == sorted(p["opened_at_s"] for p in per)
    for p in per:
        assert p["video_frames"] > 10 and p["speech_frames"] > 0 and "error" not in p, p
        assert p["first_frame_ms"]["n"] >= 1 and p["first_frame_parts_ms"]["n"] >= 1, p
    # frame 0's audio is its 120 ms lookahead (~100 ms after the first chunk at real time)
    assert result["first_frame_parts_ms_median"]["audio"] >= 50.0, result
    assert result["first_frame_ms_p50_median"] >= result["first_frame_parts_ms_median"]["audio"]


async def test_a_ramp_client_process_reply_skips_noise_and_a_dead_one_is_an_error() -> None:
    """The ramp's side of the protocol (`bench.ramp_clients._Child`): lines without the
    REPLY prefix (a library's print) are skipped, an error reply and a child that exits are
    RuntimeErrors naming what happened."""

    async def child(code: str) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return _Child(proc)

    echo = await child(
        "import sys\n"
        "for line in sys.stdin:\n"
        "    print('some library talking', flush=True)\n"
        "    print('REPLY {\"status\": 201, \"got\": ' + line.strip() + '}', flush=True)\n"
    )
    assert await echo.ask({"open": 1, "t": 0.5}) == {"status": 201, "got": {"open": 1, "t": 0.5}}
    assert echo.proc.stdin is not None
    echo.proc.stdin.close()
    assert await echo.proc.wait() == 0

    failing = await child('import sys; sys.stdin.readline(); print(\'REPLY {"error": "boom"}\')')
    with pytest.raises(RuntimeError, match="failed: boom"):
        await failing.ask({"open": 1, "t": 0.0})
    await failing.proc.wait()

    dead = await child("import sys; sys.stdin.readline(); sys.exit(3)")
    with pytest.raises(RuntimeError, match="ended \\(exit code 3\\)"):
        await dead.ask({"finish": True})
