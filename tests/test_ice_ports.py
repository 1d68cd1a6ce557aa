"""A fixed UDP port range for the ICE host candidates (`ice_port_range`,
`server.media.ice_ports`): aioice's own candidate gathering binds inside the range, spreads
over it, and gets no host candidate (with a warning) once every port of it is taken; a real
server's answers to real aiortc offers name only ports of the range, in the server process and
in a media process, and their sessions stream."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.media import ice_ports
from server.settings import Settings, SettingsError, port_range

HOST = re.compile(r"^a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ host", re.M)


def free_range(size: int) -> tuple[int, int]:
    """`size` consecutive UDP ports free on every address (checked by binding them)."""
    for base in range(42000, 60000, 97):
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base, base + size - 1
    raise RuntimeError("no free UDP port range")


@pytest.fixture
def applied() -> Iterator[None]:
    yield
    ice_ports.apply(None)


async def host_ports() -> list[int]:
    from aioice import Connection

    conn = Connection(ice_controlling=False, components=1)
    try:
        await conn.gather_candidates()
        return [c.port for c in conn.local_candidates if c.type == "host"]
    finally:
        await conn.close()


async def test_host_candidates_bind_inside_the_range(applied: None) -> None:
    import aioice.ice

    low, high = free_range(8)
    ice_ports.apply((low, high))
    first = await host_ports()
    assert first and all(low <= p <= high for p in first)
    second = await host_ports()
    assert all(low <= p <= high for p in second)
    assert second[0] != first[0]  # the next connection starts further on: spread over it
    ice_ports.apply(None)
    assert aioice.ice.asyncio is asyncio
    assert not any(low <= p <= high for p in await host_ports())


async def test_a_full_range_gives_no_host_candidate_and_says_so(
    applied: None, caplog: pytest.LogCaptureFixture
) -> None:
    low, high = free_range(2)
    held = []
    for port in (low, high):  # taken on every address of both families
        for family, anywhere in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((anywhere, port))
            except OSError:  # no IPv6 here
                s.close()
                continue
            held.append(s)
    try:
        ice_ports.apply((low, high))
        with caplog.at_level(logging.WARNING, logger="server.media.ice_ports"):
            assert await host_ports() == []
        assert "every port of ice_port_range is taken" in caplog.text
    finally:
        for s in held:
            s.close()


def test_the_setting_is_checked() -> None:
    assert port_range("") is None and port_range("40000-40099") == (40000, 40099)
    assert Settings(ice_port_range="40000-40000").ice_port_range == "40000-40000"
    for bad in ("40000", "1000-2000", "50000-40000", "40000-70000", "a-b"):
        with pytest.raises(SettingsError, match="ice_port_range"):
            Settings(ice_port_range=bad)


@pytest.mark.parametrize("media_processes", [0, 1])
async def test_a_real_answer_names_only_ports_of_the_range(
    tmp_path: Path, media_processes: int
) -> None:
    low, high = free_range(16)
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=True,
        media_processes=media_processes,
        ice_port_range=f"{low}-{high}",
        connect_timeout_s=60.0,
    )
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    clients = [LoopbackClient(srv.base_url), LoopbackClient(srv.base_url)]
    try:
        avatar = wait_first_avatar_ready(srv.base_url)
        ports = []
        for client in clients:
            session = await client.open(avatar)
            ports.append({int(p) for _, p in HOST.findall(session["sdp"])})
            await client.wait_frames(10)
        assert all(p and all(low <= q <= high for q in p) for p in ports), ports
        assert not ports[0] & ports[1]  # each session its own ports
    finally:
        for client in clients:
            await client.close()
        srv.stop()
        await asyncio.to_thread(ice_ports.apply, None)
