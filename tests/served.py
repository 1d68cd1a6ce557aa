"""A real server in a process of its own, for tests that read its log or measure its memory.

`ServerProcess` runs `lipstream serve` (or any other command serving the app, e.g. uvicorn's
own CLI) on a free loopback port, its stdout and stderr into a file (a pipe could fill and
block the server), and stops it at the end of the with-block.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parent.parent
LIPSTREAM = [sys.executable, "-c", "from lipstream.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lipstream_serve(port: int, avatars_dir: Path, *args: str) -> list[str]:
    """The command line of `lipstream serve` with the preview engine on `port`."""
    return [
        *LIPSTREAM,
        "serve",
        "--engine",
        "preview",
        "--port",
        str(port),
        "--avatars-dir",
        str(avatars_dir),
        *args,
    ]


class ServerProcess:
    def __init__(
        self, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
        self.command = command
        self.port = port
        self.log_path = log_path
        self.env = {**base, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, within: float = 90.0, avatar: bool = False) -> ServerProcess:
        """Start, then wait for /readyz (and, with `avatar`, for the first avatar ready)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + within
        with httpx.Client(base_url=self.base_url, timeout=5.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {self.log()[-3000:]}")
                try:
                    if http.get("/readyz").status_code == 200 and (
                        not avatar or self._avatar_ready(http)
                    ):
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the server did not become ready: {self.log()[-3000:]}")

    @staticmethod
    def _avatar_ready(http: httpx.Client) -> bool:
        listed = http.get("/v1/avatars").json()["avatars"]
        return bool(listed) and listed[0]["status"] == "ready"

    def first_avatar(self) -> str:
        return str(httpx.get(f"{self.base_url}/v1/avatars").json()["avatars"][0]["id"])

    def rss_bytes(self) -> int:
        """The server process's resident memory now."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, within: float = 5.0) -> bool:
        """Whether `text` shows in the log within `within` seconds."""
        deadline = time.monotonic() + within
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
