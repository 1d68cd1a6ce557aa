"""Hostile HTTP against a real server (`lipstream serve`, or uvicorn's own CLI, in a process of
its own, its log read back):

- secrets in query strings: access lines are written, redacted, never a logging error;
- JSON nested far deeper than the parser's recursion limit answers 400;
- 1,000 connections that never finish their headers do not keep a normal client out, and are
  closed (408) once the header timeout passes; a body trickled slower than the minimum rate is
  cut off; uploads being received at once and open connections are capped; every limit that
  bites says so in the log, a line per kind, not one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from served import ServerProcess, free_port, lipstream_serve
from websockets.exceptions import InvalidStatus

HELD = 1000
SECRETS = ("tok-secret-0001", "key-secret-0002", "acc-secret-0003", "wst-secret-0004")
API_KEY = "api-key-secret-0005"
HEADER_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 2.0
BODY_MIN_RATE = 1024


@pytest.fixture(scope="module", autouse=True)
def enough_files() -> None:
    """Room for the held connections in this process's open-file limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * HELD
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("hostile-http")
    port = free_port()
    limits = {
        "header_timeout_s": HEADER_TIMEOUT_S,
        "body_timeout_s": BODY_TIMEOUT_S,
        "body_min_rate": BODY_MIN_RATE,
        "max_uploads_in_flight": 2,
    }
    sets = [a for k, v in limits.items() for a in ("--set", f"{k}={v}")]
    with ServerProcess(lipstream_serve(port, tmp / "avatars", *sets), port, tmp / "log") as srv:
        yield srv.start()


# -- log redaction -----------------------------------------------------------------------
def uvicorn_cli(port: int) -> list[str]:
    """The app served by uvicorn's own CLI: its own log formatters, which unpack each access
    record's five arguments."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "server.app:create_app",
        "--port",
        str(port),
    ]


@pytest.mark.parametrize("launcher", ["lipstream", "uvicorn"])
async def test_secrets_in_query_strings_are_redacted_in_access_lines(
    tmp_path: Path, launcher: str
) -> None:
    port = free_port()
    avatars = tmp_path / "avatars"
    env = {"LIPSTREAM_ENGINE": "preview", "LIPSTREAM_AVATARS_DIR": str(avatars)}
    env["LIPSTREAM_API_KEY"] = API_KEY
    command = lipstream_serve(port, avatars) if launcher == "lipstream" else uvicorn_cli(port)
    with ServerProcess(command, port, tmp_path / "log", env=env) as srv:
        srv.start()
        tok, key, acc, wst = SECRETS
        async with httpx.AsyncClient(base_url=srv.base_url) as http:
            for _ in range(3):
                assert (await http.get(f"/healthz?token={tok}")).status_code == 200
            await http.get(f"/readyz?api_key={key}&x=1")
            r = await http.get(
                f"/v1/avatars?access_token={acc}&key={API_KEY}",
                headers={"authorization": f"Bearer {API_KEY}"},
            )
            assert r.status_code == 200
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{port}/v1/sessions/se_x/audio?token={wst}")
        await asyncio.to_thread(srv.wait_log, "/v1/avatars?", 5.0)
        srv.stop()
        text = srv.log()
    assert "Logging error" not in text, text[-3000:]
    for secret in (*SECRETS, API_KEY):
        assert secret not in text, text[-3000:]
    assert text.count("GET /healthz?token=<redacted> HTTP/1.1") == 3, text[-3000:]
    assert "GET /readyz?api_key=<redacted>&x=1 HTTP/1.1" in text
    assert "GET /v1/avatars?access_token=<redacted>&key=<redacted> HTTP/1.1" in text
    assert "/v1/sessions/se_x/audio?token=<redacted>" in text


# -- nested JSON ---------------------------------------------------------------------------
async def test_deeply_nested_json_offer_is_a_400(server: ServerProcess) -> None:
    bodies = [  # within the body size limit, far past the JSON parser's recursion limit
        "[" * 30_000 + "]" * 30_000,
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        '{"avatar_id": "av_1", "type": "offer", "sdp": ' + "[" * 20_000 + "]" * 20_000 + "}",
    ]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        for body in bodies:
            r = await http.post(
                "/v1/sessions", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 400, (body[:20], r.status_code, r.text[:200])
            assert "JSON" in r.json()["detail"]
        deep = "[" * 100_000 + "]" * 100_000  # past the body size limit too
        r = await http.post("/v1/sessions", content=deep)
        assert r.status_code in (400, 413), r.status_code
        assert (await http.get("/healthz")).status_code == 200
    assert server.alive()
    assert "RecursionError" not in server.log()


# -- connections ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def held_connections(
    port: int, n: int, first_bytes: list[bytes]
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """`n` raw connections, connection i having sent `first_bytes[i % len]` and nothing more."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, n, 100):
            batch = await asyncio.gather(
                *(
                    asyncio.open_connection("127.0.0.1", port)
                    for _ in range(start, min(n, start + 100))
                )
            )
            conns.extend(batch)
        for i, (_, writer) in enumerate(conns):
            data = first_bytes[i % len(first_bytes)]
            if data:
                writer.write(data)
        await asyncio.gather(*(w.drain() for _, w in conns))
        yield conns
    finally:
        for _, writer in conns:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


async def read_to_end(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """What the server sent before closing; None if it is still open after `within` s."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""


async def timed_get(http: httpx.AsyncClient, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    r = await http.get(path)
    return r.status_code, time.monotonic() - t0


PARTIAL = [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "]


async def test_a_normal_client_is_served_while_1000_incomplete_requests_are_held(
    server: ServerProcess,
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        baseline = [(await timed_get(http, "/healthz"))[1] for _ in range(5)]
    t_open = time.monotonic()
    async with held_connections(server.port, HELD, PARTIAL) as conns:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            served = [await timed_get(http, "/healthz") for _ in range(5)]
            r = await http.post("/v1/sessions", content=b"not json")
        assert all(status == 200 for status, _ in served), served
        assert max(t for _, t in served) < max(1.0, 20 * max(baseline)), (baseline, served)
        assert r.status_code == 400
        assert len(conns) == HELD
        # all of them are closed once the header timeout has passed; a request begun gets 408
        left = HEADER_TIMEOUT_S - (time.monotonic() - t_open) + 5.0
        ends = await asyncio.gather(*(read_to_end(reader, max(left, 1.0)) for reader, _ in conns))
    still_open = sum(1 for e in ends if e is None)
    timed_out = sum(1 for e in ends if e is not None and e.startswith(b"HTTP/1.1 408"))
    print(
        f"\n{HELD} incomplete requests held: /healthz {max(baseline) * 1e3:.0f} -> "
        f"{max(t for _, t in served) * 1e3:.0f} ms; {still_open} still open after the header "
        f"timeout, {timed_out} answered 408"
    )
    assert still_open == 0
    assert timed_out == HELD // 2
    log = server.log()
    assert 1 <= log.count("request headers not received in time") <= 3, log[-2000:]
    assert 1 <= log.count("connection sent no request in time") <= 3


async def test_oversized_headers_are_a_431(server: ServerProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(200):  # 200 KiB of headers, never ending
            writer.write(f"X-Pad-{i}: ".encode() + b"a" * 1024 + b"\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        answer = await read_to_end(reader, 5.0)
    finally:
        writer.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 431"), answer
    assert server.alive()


async def test_a_trickled_body_is_cut_off(server: ServerProcess) -> None:
    head = (
        b"POST /v1/avatars HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n--b0undary\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def trickle() -> None:  # 50 bytes a second, far under the minimum rate
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            while not writer.is_closing():
                writer.write(b"x" * 10)
                await writer.drain()
                await asyncio.sleep(0.2)

    tracebacks = server.log().count("Traceback")
    t0 = time.monotonic()
    task = asyncio.create_task(trickle())
    try:
        answer = await read_to_end(reader, BODY_TIMEOUT_S + 8)
        took = time.monotonic() - t0
    finally:
        writer.close()
        await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    print(f"\na body trickled at 50 B/s: closed after {took:.1f} s")
    assert answer is not None, f"a body trickled for {took:.1f} s and the server waits on"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert took < BODY_TIMEOUT_S + 3
    await asyncio.sleep(0.3)
    log = server.log()
    assert "request body not received in time" in log
    assert log.count("Traceback") == tracebacks, log[-3000:]


async def test_uploads_in_flight_are_capped(server: ServerProcess) -> None:
    head = (
        b"POST /v1/avatars HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n--b0undary\r\n"
    )
    uploads = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    try:
        for _, writer in uploads:
            writer.write(head)
            await writer.drain()
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            r = await http.post("/v1/avatars", files={"file": ("a.png", b"\x89PNG")})
            assert r.status_code == 503 and r.json()["reason"] == "uploads", r.text
            assert r.headers["retry-after"]
            for _, writer in uploads:
                writer.close()
            await asyncio.sleep(0.3)
            r = await http.post("/v1/avatars", files={"file": ("a.png", b"\x89PNG")})
            assert r.status_code != 503, r.text
    finally:
        for _, writer in uploads:
            writer.close()
    assert "upload limit reached" in server.log()


async def test_connections_past_the_cap_close_the_longest_idle(tmp_path: Path) -> None:
    port, cap = free_port(), 100
    sets = ["--set", f"max_connections={cap}", "--set", "header_timeout_s=30"]
    command = lipstream_serve(port, tmp_path / "avatars", *sets)
    with ServerProcess(command, port, tmp_path / "log") as srv:
        srv.start()
        async with held_connections(port, 3 * cap, PARTIAL) as conns:
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
                status, took = await timed_get(http, "/healthz")
            ends = await asyncio.gather(*(read_to_end(reader, 1.0) for reader, _ in conns))
        closed = [i for i, e in enumerate(ends) if e is not None]
        print(
            f"\n{3 * cap} idle connections, cap {cap}: {len(closed)} closed, /healthz {took * 1e3:.0f} ms"
        )
        assert status == 200
        assert len(closed) >= 2 * cap  # the server held no more than the cap
        assert sum(i < cap for i in closed) >= 0.9 * cap  # the oldest went first
        assert sum(i >= 2 * cap for i in closed) <= 0.1 * cap + 1
        # requests whose bodies are being read are not closed for a newcomer: it gets 503
        body_phase = [b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"]
        async with held_connections(port, cap, body_phase):
            await asyncio.sleep(0.5)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                answer = await read_to_end(reader, 5.0)
            finally:
                writer.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
        await asyncio.sleep(0.5)  # the requests cut off mid-body are answered (to no one)
        log = srv.log()
        assert 1 <= log.count("connection limit reached: idle connection closed") <= 3
        assert log.count("connection limit reached: new connection refused") == 1
        assert "Traceback" not in log, log[-3000:]
