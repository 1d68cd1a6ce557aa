"""`.ci/audit.py` (the registry-only dependency audit of `make check`) against a real HTTP
server on loopback that serves project JSON the way PyPI does."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROJECTS = {
    "safe": {"info": {"version": "1.0"}, "vulnerabilities": []},
    "bad": {
        "info": {"version": "2.0"},
        "vulnerabilities": [
            {"id": "PYSEC-0000-1", "withdrawn": None},
            {"id": "PYSEC-0000-2", "withdrawn": "2026-01-01"},
        ],
    },
    "old": {"info": {"version": "3.1"}, "vulnerabilities": []},
}


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ci_audit"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.strip("/").split("/")[0]
        body = PROJECTS.get(name)
        if body is None:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def index() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_vulnerable_latest_release_fails(
    index: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = _load()
    monkeypatch.setattr(audit, "installed", lambda: {"safe": "1.0", "bad": "2.0"})
    assert audit.main(["--index", index]) == 1
    out = capsys.readouterr().out
    assert "VULNERABLE bad 2.0: PYSEC-0000-1" in out and "PYSEC-0000-2" not in out


def test_older_releases_are_listed_not_passed_as_audited(
    index: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = _load()
    installed = {"safe": "1.0+cpu", "old": "3.0", "gone": "1.0"}
    monkeypatch.setattr(audit, "installed", lambda: installed)
    assert audit.main(["--index", index]) == 0
    out = capsys.readouterr().out
    assert "not audited here: old 3.0 (latest 3.1)" in out
    assert "gone 1.0 (the registry did not answer)" in out
    assert "3 distributions, 1 audited" in out
    assert audit.main(["--index", index, "--strict"]) == 1


def test_no_answer_at_all_is_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    audit = _load()
    monkeypatch.setattr(audit, "installed", lambda: {"safe": "1.0"})
    assert audit.main(["--index", "http://127.0.0.1:9", "--timeout", "2"]) == 2
