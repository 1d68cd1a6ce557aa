"""ice_advertise_address: a server behind 1:1 NAT names the advertised address in its answer's
host candidates, with their own ports; a real server's answer to a real aiortc offer, and the
rewrite on its own (IPv6, mDNS names and the `c=` line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.media.advertise import advertise
from server.settings import Settings, SettingsError

PUBLIC = "203.0.113.7"
HOST = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) (\d+) typ host", re.M)

ANSWER = "\r\n".join(
    [
        "v=0",
        "m=video 38357 UDP/TLS/RTP/SAVPF 97",
        "c=IN IP4 192.0.2.2",
        "a=candidate:f9 1 udp 2130706431 192.0.2.2 38357 typ host",
        "a=candidate:f8 1 udp 2130706431 10.1.0.5 40001 typ host",
        "a=candidate:d0 1 udp 2130706431 fd00::2 48457 typ host",
        "a=candidate:e1 1 udp 2130706431 abc.local 48458 typ host",
        "a=candidate:a2 1 udp 1694498815 198.51.100.9 50000 typ srflx raddr 192.0.2.2 rport 38357",
        "a=end-of-candidates",
        "",
    ]
)


def test_rewrite_names_the_address_for_its_family_only() -> None:
    out = advertise(ANSWER, PUBLIC)
    assert HOST.findall(out) == [
        (PUBLIC, "38357"),
        (PUBLIC, "40001"),
        ("fd00::2", "48457"),
        ("abc.local", "48458"),
    ]
    assert f"c=IN IP4 {PUBLIC}\r\n" in out
    assert "198.51.100.9 50000 typ srflx raddr 192.0.2.2" in out  # left as it was
    assert advertise(ANSWER, "") == ANSWER
    six = advertise(ANSWER, "2001:db8::5")
    assert ("2001:db8::5", "48457") in HOST.findall(six) and "c=IN IP4 192.0.2.2" in six


def test_setting_is_an_address() -> None:
    with pytest.raises(SettingsError, match="ice_advertise_address"):
        Settings(ice_advertise_address="example.com")


async def test_server_answer_advertises_the_address(tmp_path: Path) -> None:
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=True,
        ice_advertise_address=PUBLIC,
    )
    with ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")) as srv:
        avatar_id = wait_first_avatar_ready(srv.base_url)
        client = LoopbackClient(srv.base_url)
        try:
            answer = (await client.open(avatar_id))["sdp"]
        finally:
            await client.close()
    hosts = HOST.findall(answer)
    ipv4 = [h for h in hosts if ":" not in h[0]]
    assert ipv4 and all(address == PUBLIC for address, _ in ipv4), hosts
    # each candidate keeps its socket's port (the media line names the default candidate's)
    ports = {port for _, port in ipv4}
    assert re.search(r"^m=video (\d+) ", answer, re.M).group(1) in ports  # type: ignore[union-attr]
    assert f"c=IN IP4 {PUBLIC}" in answer
