"""Where the admission ramp's sessions live: in the ramp's own process (`LocalClients`) or
spread over child processes (`ProcessClients`).

One Python process receiving two dozen 720p streams is itself GIL-bound, and the intervals
its clients measure then include its own scheduling (the soak spreads its clients over
processes for the same reason, `bench.soak.soak_with_client_processes`). With
`ProcessClients` the ramp keeps deciding when to open a session and when to stop; each
attempt goes to the child holding the fewest sessions, which opens it with a `LocalClients`
of its own and answers what the server said. At the end every child reports its sessions and
closes them.

The protocol between the ramp and a child is one JSON object a line: on the child's stdin
`{"open": attempt, "t": seconds}` and `{"finish": true}`; on its stdout, after the prefix
`REPLY`, the outcome of the attempt or the finished sessions' rows (`{"per_session": [...]}`).
Other output of the child (a library's print) is not a reply and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from typing import Any

import httpx

from bench.loopback import SessionRefused
from bench.soak import SoakClient, _info, _ms, _pct, _speak, skip_video_decoding

FIRST_FRAMES_WITHIN_S = 60.0
ADMITTED_STATUS = 201  # what POST /v1/sessions answers when it opens a session
REPLY = "REPLY "
REPLY_TIMEOUT_S = 90.0  # an open (SDP, ICE, the audio websocket) or a finish (closing them all)


async def _session_life(client: SoakClient, seed: int) -> int:
    """An admitted session: wait for its first frames, measure its video from then on, and
    speak until cancelled (the ramp's end)."""
    await client.first_frames(1, within=FIRST_FRAMES_WITHIN_S)
    client.video.measuring = True
    return await _speak(client, math.inf, seed)


class LocalClients:
    """The ramp's sessions in this process."""

    def __init__(self, server_url: str, avatar_id: str) -> None:
        self.server_url = server_url
        self.avatar_id = avatar_id
        self.clients: list[SoakClient] = []
        self.opened_at: list[float] = []
        self.speakers: list[asyncio.Task[int]] = []

    @property
    def admitted(self) -> int:
        return len(self.clients)

    async def open(self, attempt: int, t: float) -> dict[str, Any]:
        """Open one session (attempt number `attempt`, `t` seconds into the ramp); the
        server's answer: status, reason, detail, retry_after (reason None when admitted)."""
        client = SoakClient(self.server_url)
        try:
            await client.open(self.avatar_id)
        except SessionRefused as exc:
            with contextlib.suppress(Exception):
                await client.close(delete=False)
            return {
                "status": exc.status,
                "reason": exc.reason,
                "detail": exc.detail,
                "retry_after": exc.retry_after,
            }
        self.clients.append(client)
        self.opened_at.append(t)
        await client.connect_audio()
        self.speakers.append(asyncio.create_task(_session_life(client, attempt)))
        return {"status": ADMITTED_STATUS, "reason": None, "detail": None, "retry_after": None}

    async def finish(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        """Each session's row (the server's figures and the client's), then close them."""
        infos = []
        for c in self.clients:
            try:
                infos.append(await _info(http, c))
            except (httpx.HTTPError, ValueError) as exc:
                infos.append({"error": repr(exc)})
        for task in self.speakers:
            task.cancel()
        ended = await asyncio.gather(*self.speakers, return_exceptions=True)
        rows = [
            _per_session(c, at, info, end)
            for c, at, info, end in zip(self.clients, self.opened_at, infos, ended, strict=True)
        ]
        await self.close()
        return rows

    async def close(self) -> None:
        for task in self.speakers:
            task.cancel()
        await asyncio.gather(*self.speakers, return_exceptions=True)
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()
        self.clients, self.opened_at, self.speakers = [], [], []


def _per_session(
    client: SoakClient, opened_at: float, info: dict[str, Any], ended: Any
) -> dict[str, Any]:
    iv = client.video.intervals
    row = {
        "session_id": client.session.get("session_id"),
        "client_pid": os.getpid(),  # which process received it
        "opened_at_s": round(opened_at, 2),
        "state": info.get("state"),
        "speech_frames": info.get("speech_frames"),
        "engine_late_frames": info.get("engine_late_frames"),
        "frames_dropped": info.get("frames_dropped"),
        "held_frames": info.get("held_frames"),
        "video_frames": client.video.frames,
        "frames_missing_at_client": client.video.missing,
        "frame_interval_ms_p50": _ms(_pct(iv, 50)),
        "frame_interval_ms_p99": _ms(_pct(iv, 99)),
        # its utterances' first frames (the server's figures), and where their time went
        "first_frame_ms": info.get("first_frame_ms"),
        "first_frame_parts_ms": info.get("first_frame_parts_ms"),
    }
    if "error" in info:
        row["info_error"] = info["error"]
    if isinstance(ended, BaseException) and not isinstance(ended, asyncio.CancelledError):
        row["error"] = repr(ended)  # its first frames never came, or its websocket failed
    return row


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.admitted = 0

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            return await asyncio.wait_for(self._reply(), REPLY_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"a ramp client process did not answer {message} within {REPLY_TIMEOUT_S:g} s"
            ) from None

    async def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = (await self.proc.stdout.readline()).decode(errors="replace")
            if not line:
                code = await self.proc.wait()
                raise RuntimeError(f"a ramp client process ended (exit code {code})")
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY) :])
                if "error" in reply:
                    raise RuntimeError(f"a ramp client process failed: {reply['error']}")
                return dict(reply)


class ProcessClients:
    """The ramp's sessions spread over `processes` child processes (see the module
    docstring); `start` them first, `close` them in the end whatever happened."""

    def __init__(self, server_url: str, avatar_id: str, processes: int) -> None:
        if processes < 2:
            raise ValueError(f"client processes need processes >= 2, got {processes}")
        self.server_url = server_url
        self.avatar_id = avatar_id
        self.processes = processes
        self.children: list[_Child] = []

    @property
    def admitted(self) -> int:
        return sum(c.admitted for c in self.children)

    async def start(self) -> None:
        for _ in range(self.processes):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from bench.ramp_clients import child_main; child_main()",
                self.server_url,
                self.avatar_id,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=dict(os.environ),
            )
            self.children.append(_Child(proc))

    async def open(self, attempt: int, t: float) -> dict[str, Any]:
        child = min(self.children, key=lambda c: c.admitted)  # the first with the fewest
        answer = await child.ask({"open": attempt, "t": t})
        if answer.get("status") == ADMITTED_STATUS:
            child.admitted += 1
        return answer

    async def finish(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        del http  # each child asks the server with a client of its own
        replies = await asyncio.gather(*(c.ask({"finish": True}) for c in self.children))
        rows = [row for reply in replies for row in reply["per_session"]]
        return sorted(rows, key=lambda r: r["opened_at_s"])

    async def close(self) -> None:
        for child in self.children:
            if child.proc.stdin is not None and not child.proc.stdin.is_closing():
                child.proc.stdin.close()  # end of input: a child closes its sessions and exits
        for child in self.children:
            try:
                await asyncio.wait_for(child.proc.wait(), REPLY_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        self.children = []


async def _serve(server_url: str, avatar_id: str) -> None:
    """A child: take commands from stdin until `finish` or the end of input."""
    local = LocalClients(server_url, avatar_id)
    try:
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as http:
            while True:
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:
                    return
                message = json.loads(line)
                try:
                    if "open" in message:
                        reply = await local.open(int(message["open"]), float(message["t"]))
                    else:
                        reply = {"per_session": await local.finish(http)}
                except Exception as exc:  # reported to the ramp, which stops
                    reply = {"error": repr(exc)}
                print(REPLY + json.dumps(reply), flush=True)
                if "per_session" in reply:
                    return
    finally:
        await local.close()


def child_main() -> None:
    """Entry point of a ramp client process: argv is the server URL and the avatar id."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # aiortc's closing-task noise
    for name in ("aioice", "aiortc", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    skip_video_decoding()  # this process is only clients
    server_url, avatar_id = sys.argv[1], sys.argv[2]
    asyncio.run(_serve(server_url, avatar_id))
