"""`lipstream bench --soak` against a running server (`--soak-url` + `--soak-pid`): a real
uvicorn server on loopback (preview engine, CPU) and real aiortc clients speaking at real
time; the soak's numbers come from what the clients received and the server reported."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import cv2
import httpx
import pytest

from bench.loopback import ServerThread, wait_first_avatar_ready
from bench.soak import soak
from server.app import create_app
from server.settings import Settings


def _add_avatar(base_url: str) -> None:
    from skimage.data import astronaut

    ok, png = cv2.imencode(".png", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    r = httpx.post(
        base_url + "/v1/avatars",
        files={"file": ("astronaut.png", png.tobytes(), "image/png")},
        data={"name": "astronaut"},
    )
    assert r.status_code == 202, r.text
    assert wait_first_avatar_ready(base_url, within=60) == r.json()["id"]


def test_soak_attached_server_samples_its_memory(tmp_path: Path) -> None:
    from engines.preview import PreviewEngine

    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars", max_sessions=4)
    app = create_app(settings, engine=PreviewEngine(), reason="soak test")
    with ServerThread(app) as srv:
        _add_avatar(srv.base_url)
        # the server runs in this process: its pid is ours
        result = asyncio.run(soak(2, 0.4, server_url=srv.base_url, server_pid=os.getpid()))
    assert result["sessions"] == 2 and result["engine"] == "preview"
    assert result["window_s"] >= 15
    assert result["fps_min"] >= 23.0, result["per_session"]
    assert result["frames_missing_at_client"] == 0
    assert result["server_frames_dropped"] == 0
    assert result["frame_interval_ms_p99"] is not None
    assert result["frame_interval_ms_p99"] < 120.0
    assert all(p["utterances"] >= 2 for p in result["per_session"])
    # the engine kept up: speech played at the pace it was spoken, no backlog built up
    assert result["speech_fps"] > 10, result["samples"]
    assert result["rendered_fps"] >= result["speech_fps"] * 0.8
    assert result["worker_step_ms_mean"] is not None and result["worker_frames_per_step"] >= 1
    assert result["worker_launch_ms_mean"] > 0  # the synchronous worker's launch is its step
    assert result["speech_backlog_s_max"] < 5.0, result["samples"]
    assert all(p["playout_at_end"]["backlog_s"] < 5.0 for p in result["per_session"])
    # where the first frames' time went (server.session.playout's breakdown), medians over the sessions
    parts = result["first_frame_parts_ms_median"]
    assert parts["audio"] is not None and parts["audio"] >= 50.0, parts  # frame 0's lookahead
    assert parts["made"] is not None and parts["wait"] is not None, parts
    assert result["first_frame_ms_p50_median"] >= parts["audio"]
    # the worker's turnaround gauge (server.session.turnaround) was sampled while they spoke
    assert result["turnaround_ms_max"] is not None and 0 < result["turnaround_ms_max"] < 1000
    # memory sampled every 5 s from the given pid, growth computed over the window
    assert len([s for s in result["samples"] if s.get("rss")]) >= 4
    assert result["rss_mb_after_warmup"] > 50
    assert result["rss_growth_mb"] is not None and abs(result["rss_growth_mb"]) < 200
    # this soak samples only between opening its sessions and closing them
    assert [s["open"] for s in result["samples"]] == [2] * len(result["samples"])
    assert result["samples_all_open"] == len(result["samples"])
    # the server's stall counters were sampled (server.ops.stall_watch's loop lag every 20 ms)
    assert set(result["stalls"]) >= {"loop_lags_over_250ms", "gc_full_collections", "malloc_trims"}
    lag_n = [s["lag_n"] for s in result["samples"] if "lag_n" in s]
    assert lag_n[-1] > lag_n[0] + 100
    parts = result["rss_growth_parts_mb"]  # where RSS goes, for a soak that grows
    assert set(parts) == {"server_anon", "server_file", "server_shmem", "media"}
    first = next(s for s in result["samples"] if s.get("rss_parts"))
    assert 0 < first["rss_parts"]["server_anon"] <= first["rss"]


def test_soak_refuses_a_pid_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="no process"):
        asyncio.run(soak(1, 0.1, server_url="http://127.0.0.1:9", server_pid=2**22 + 12345))


def test_soak_with_client_processes_and_media_processes(tmp_path: Path) -> None:
    """The GPU soak's setup on the CPU: the server's WebRTC in a media process, the clients in
    two processes of their own; memory sampled over the server and its media process."""
    from bench.soak import soak_with_client_processes
    from engines.preview import PreviewEngine

    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", max_sessions=4, media_processes=1
    )
    app = create_app(settings, engine=PreviewEngine(), reason="soak test")
    with ServerThread(app) as srv:
        _add_avatar(srv.base_url)
        # as the GPU soak runs it: the clients time frames without decoding them
        result = asyncio.run(
            soak_with_client_processes(
                2, 0.4, 2, srv.base_url, server_pid=os.getpid(), decode=False
            )
        )
    assert result["client_processes"] == 2 and len(result["per_session"]) == 2
    assert result["client_decodes_video"] is False
    assert result["fps_min"] >= 23.0, result["per_session"]
    assert result["server_frames_dropped"] == 0
    assert result["frames_missing_at_client"] == 0
    assert all(p["utterances"] >= 2 for p in result["per_session"])
    assert len([s for s in result["samples"] if s.get("rss")]) >= 4
    # this process plus its media process (~100 MB of its own)
    assert result["rss_mb_after_warmup"] > 100
    # the window's figures come from samples with both sessions open: none of the ramp-up
    # or the teardown (where RSS reads hundreds of MB lower at 20 sessions)
    assert result["samples_all_open"] >= 2
    assert any(s.get("open", 0) < 2 for s in result["samples"])  # ramp-up or teardown sampled
    assert result["samples_all_open"] < len(result["samples"])


def test_window_figures_leave_out_the_teardown() -> None:
    """A soak's memory and engine figures span the samples with every session open; a
    teardown sample (sessions closing, RSS falling) does not end the window."""
    from bench.soak import all_open

    def sample(t: float, open_: int, rss: int) -> dict[str, float]:
        return {"t": t, "open": open_, "rss": rss}

    samples = [sample(0, 3, 10), sample(5, 20, 50), sample(10, 20, 52), sample(15, 20, 51)]
    samples += [sample(20, 12, 20), sample(25, 0, 15)]
    window = all_open(samples, 20)
    assert [s["t"] for s in window] == [5, 10, 15]
    assert all_open(samples, 21) == []
    assert all_open([{"t": 0}, {"t": 5}], 20) == [{"t": 0}, {"t": 5}]  # no counts: all kept


def test_client_processes_need_a_share_each() -> None:
    from bench.soak import soak_with_client_processes

    with pytest.raises(ValueError, match="client processes"):
        asyncio.run(soak_with_client_processes(1, 0.1, 2, "http://127.0.0.1:9"))


def test_timestamp_decoder_keeps_each_frames_rtp_timestamp() -> None:
    import aiortc.rtcrtpreceiver as receiver
    from aiortc.codecs import get_capabilities, get_decoder
    from aiortc.jitterbuffer import JitterFrame

    from bench.soak import TimestampDecoder, skip_video_decoding

    frames = TimestampDecoder().decode(JitterFrame(b"not even vp8", 123_456))
    assert len(frames) == 1 and frames[0].pts == 123_456 and frames[0].width == 16
    original = receiver.get_decoder
    try:
        skip_video_decoding()
        video = next(c for c in get_capabilities("video").codecs if c.mimeType == "video/VP8")
        audio = next(c for c in get_capabilities("audio").codecs if c.mimeType == "audio/opus")
        assert isinstance(receiver.get_decoder(video), TimestampDecoder)
        assert type(receiver.get_decoder(audio)) is type(get_decoder(audio))
    finally:
        receiver.get_decoder = original
