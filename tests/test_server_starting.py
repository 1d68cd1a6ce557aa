"""Serving while the server starts (`server.ops.starting`): a real server on loopback whose
engine's warm-up is held at a gate, as the compiled backend's is for minutes on a GPU (no GPU
on CI: the preview engine's warm-up hook stands in, reporting progress the same way)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from bench.loopback import ServerThread
from engines.pipeline.warm_up import WarmUpCancelled, WarmUpProgress, progress
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings


class GatedWarmUp(PreviewEngine):
    """A preview engine whose warm-up does one step, waits for `gate`, then fails (`fail`)
    or does its second step."""

    def __init__(self, gate: threading.Event, fail: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.fail = fail
        self.error: BaseException | None = None

    def warmup(self) -> None:
        progress.begin(2, "test warm-up")
        progress.step_done("first step")
        if not self.gate.wait(30):
            raise RuntimeError("the test's gate never opened")
        if self.fail:
            raise RuntimeError("the warm-up broke")
        try:
            progress.step_done("second step")
        except WarmUpCancelled as exc:
            self.error = exc
            raise


def _poll(http: httpx.Client, until: Any, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get("/readyz")
        if until(r):
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def _server(tmp_path: Path, engine: PreviewEngine) -> ServerThread:
    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars")
    app = create_app(settings, engine=engine, reason="test")
    return ServerThread(app, wait_started=False).start()


def test_the_port_opens_while_the_engine_warms_up(tmp_path: Path) -> None:
    gate = threading.Event()
    srv = _server(tmp_path, GatedWarmUp(gate))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            r = _poll(http, lambda r: (r.json().get("warm_up") or {}).get("done") == 1)
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "starting"
            assert body["warm_up"]["total"] == 2 and body["warm_up"]["what"] == "test warm-up"
            assert body["warm_up"]["elapsed_s"] >= 0
            # the API waits: 503 with Retry-After and the same progress; the page is served
            r = http.post("/v1/avatars", files={"file": ("a.png", b"\x89PNG", "image/png")})
            assert r.status_code == 503 and r.headers["retry-after"] == "10", r.text
            assert r.json()["status"] == "starting" and "warming up" in r.json()["detail"]
            assert http.get("/v1/avatars").status_code == 503
            assert http.get("/metrics").status_code == 503
            assert http.get("/").status_code == 200
            with pytest.raises(InvalidStatus) as refused:  # a websocket is turned away
                connect(f"{srv.ws_url}/v1/sessions/se_x/audio", open_timeout=5)
            assert refused.value.response.status_code == 403
            gate.set()
            r = _poll(http, lambda r: r.status_code == 200)
            assert r.json()["status"] == "ready" and r.json()["engine"] == "preview"
            assert http.get("/v1/avatars").json() == {"avatars": []}
            assert http.get("/metrics").status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_a_failed_start_says_why_in_readyz_and_the_api(tmp_path: Path) -> None:
    gate = threading.Event()
    gate.set()
    srv = _server(tmp_path, GatedWarmUp(gate, fail=True))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=10) as http:
            r = _poll(http, lambda r: r.json()["status"] != "starting")
            assert r.status_code == 503
            assert r.json() == {"status": "failed", "error": "RuntimeError: the warm-up broke"}
            r = http.get("/v1/avatars")
            assert r.status_code == 503 and "failed to start" in r.json()["detail"], r.text
            assert http.get("/healthz").status_code == 200  # the process is up
    finally:
        srv.stop()
    # the tests' (and the soak's) ServerThread waits for the start, and says why it failed
    app = create_app(
        Settings(engine="preview", avatars_dir=tmp_path / "avatars2"),
        engine=GatedWarmUp(gate, fail=True),
        reason="test",
    )
    with pytest.raises(RuntimeError, match="failed to start: RuntimeError: the warm-up broke"):
        ServerThread(app).start()


def test_a_shutdown_during_the_warm_up_stops_it_at_its_next_step(tmp_path: Path) -> None:
    gate = threading.Event()
    engine = GatedWarmUp(gate)
    srv = _server(tmp_path, engine)
    with httpx.Client(base_url=srv.base_url, timeout=10) as http:
        _poll(http, lambda r: (r.json().get("warm_up") or {}).get("done") == 1)
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    time.sleep(0.5)  # the shutdown has cancelled the start; the warm-up waits at its gate
    gate.set()
    stopping.join(30)
    assert not stopping.is_alive()
    assert isinstance(engine.error, WarmUpCancelled)


def test_progress_counts_steps_and_cancels_at_the_next_one() -> None:
    p = WarmUpProgress()
    assert p.snapshot() is None
    p.begin(3, "compile")
    p.step_done("a", 1.5)
    snap = p.snapshot()
    assert snap is not None and (snap["what"], snap["done"], snap["total"]) == ("compile", 1, 3)
    p.step_done("b")
    p.step_done("c")
    p.step_done("an unannounced one")  # counted, the total follows
    snap = p.snapshot()
    assert snap is not None and snap["done"] == snap["total"] == 4
    p.begin(2, "the next GPU")  # the one before finished: a new count
    p.step_done("e")
    p.begin(3, "a GPU warming up beside it")  # under way: one count for both
    snap = p.snapshot()
    assert snap is not None and (snap["what"], snap["done"], snap["total"]) == (
        "the next GPU",
        1,
        5,
    )
    p.cancel()
    with pytest.raises(WarmUpCancelled):
        p.step_done("d")
    with pytest.raises(WarmUpCancelled):
        p.begin(1, "again")
    p.reset()
    p.begin(1, "again")
    with pytest.raises(ValueError):
        p.begin(-1, "bad")


def test_lipstream_serve_exits_1_when_its_start_fails(tmp_path: Path) -> None:
    """The CLI: a start that fails behind the open port shuts uvicorn down, exit status 1
    with the reason (here the avatars folder is a file)."""
    not_a_folder = tmp_path / "avatars"
    not_a_folder.write_text("a file, not a folder")
    command = [sys.executable, "-m", "lipstream", "serve", "--engine", "preview", "--port", "0"]
    proc = subprocess.run(
        [*command, "--avatars-dir", str(not_a_folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: the server failed to start:" in proc.stderr, proc.stderr[-2000:]
