"""Server settings: defaults < LIPSTREAM_* environment < flags; bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings, SettingsError


def test_precedence_and_parsing() -> None:
    env = {
        "LIPSTREAM_PORT": "9001",
        "LIPSTREAM_MAX_SESSIONS": "3",
        "LIPSTREAM_DEMO_AVATAR": "yes",
        "LIPSTREAM_IDLE_TIMEOUT_S": "12.5",
        "LIPSTREAM_ICE_SERVERS": "stun:a.example:3478, turn:b.example",
        "LIPSTREAM_AVATARS_DIR": "~/av",
        "LIPSTREAM_ENGINE": "preview",
        "LIPSTREAM_API_KEY": "0123456789",
    }
    s = Settings.from_env(env, port=9002, engine=None)
    assert s.port == 9002  # the flag wins
    assert s.engine == "preview"  # None flag: the environment
    assert s.max_sessions == 3 and s.demo_avatar is True and s.idle_timeout_s == 12.5
    assert s.ice_servers == ("stun:a.example:3478", "turn:b.example")
    assert s.avatars_dir == Path("~/av").expanduser()
    assert s.host == "127.0.0.1"  # default
    assert "0123456789" not in repr(s) and s.public()["api_key_set"] is True
    assert "api_key" not in s.public()
    assert s.gather_ms == 20.0  # the scheduler's default (engines.pipeline.scheduler.GATHER_S)
    assert Settings.from_env({"LIPSTREAM_GATHER_MS": "0"}).gather_ms == 0.0
    assert s.lead_quantile == 0.98
    assert Settings.from_env({"LIPSTREAM_LEAD_QUANTILE": "0"}).lead_quantile == 0.0


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"LIPSTREAM_PORT": "eighty"}, "LIPSTREAM_PORT"),
        ({"LIPSTREAM_DEMO_AVATAR": "maybe"}, "LIPSTREAM_DEMO_AVATAR"),
        ({"LIPSTREAM_ENGINE": "magic"}, "engine must be one of"),
        ({"LIPSTREAM_MAX_SESSIONS": "0"}, "max_sessions must be > 0"),
        ({"LIPSTREAM_PORT": "70000"}, "port"),
        ({"LIPSTREAM_HOLD_FRAMES": "-1"}, "hold_frames"),
        ({"LIPSTREAM_API_KEY": "short"}, "api_key"),
        ({"LIPSTREAM_GATHER_MS": "-5"}, "gather_ms"),
        ({"LIPSTREAM_GATHER_MS": "500"}, "gather_ms"),
        ({"LIPSTREAM_LEAD_QUANTILE": "1"}, "lead_quantile"),
        ({"LIPSTREAM_LEAD_QUANTILE": "-0.1"}, "lead_quantile"),
    ],
)
def test_bad_values_are_refused(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)
