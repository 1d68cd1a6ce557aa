"""server.ops.malloc_tuning: a trimmer thread gives the free heap pages a burst of frames left
behind back to the kernel, in the server and in processes started from it. The memory cases
run in fresh interpreters (the allocator's state is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from server.ops import malloc_tuning
from server.settings import Settings, SettingsError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")

# A burst of 200 720p frames freed after a steady few (`bench.malloc_bench.burst_kept_mb`).
# argv[1]: "none" (no trimmer), "env" (start_from_env, as a media process does) or an interval
# for start(). Prints whether the trimmer ran and the RSS (MB) still held 1 s after the burst.
PROGRAM = textwrap.dedent(
    """
    import sys
    from server.ops import malloc_tuning
    from bench.malloc_bench import burst_kept_mb

    how = sys.argv[1]
    trimmer = None
    if how == "env":
        trimmer = malloc_tuning.start_from_env()
    elif how != "none":
        trimmer = malloc_tuning.start(float(how))
    kept = burst_kept_mb(1.0)
    print(trimmer is not None and trimmer.trims > 0, round(kept, 1))
    """
)


def _run(how: str, env_interval: str | None = None) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != malloc_tuning.ENV}
    if env_interval is not None:
        env[malloc_tuning.ENV] = env_interval
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, how],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    ).stdout.split()
    return out[0], float(out[1])


@linux
def test_glibc_default_keeps_a_freed_burst() -> None:
    """The behaviour the trimmer exists for: without it the freed burst (276 MB) stays
    resident (this documents the baseline; if a libc stops doing this, the trimmer is merely
    unneeded)."""
    trimmed, kept_mb = _run("none")
    assert trimmed == "False"
    assert kept_mb > 100


@linux
def test_trimmer_returns_a_freed_burst_to_the_kernel() -> None:
    trimmed, kept_mb = _run("0.2")
    assert trimmed == "True"
    assert kept_mb < 20


@linux
def test_a_child_process_starts_the_trimmer_its_parent_asked_for() -> None:
    # what start() leaves for the media processes, which call start_from_env()
    trimmed, kept_mb = _run("env", env_interval="0.2")
    assert trimmed == "True" and kept_mb < 20
    assert _run("env", env_interval="not-a-number")[0] == "False"  # logged, not fatal


def test_trimmer_thread_trims_on_its_interval_and_stops() -> None:
    calls: list[int] = []

    def fake_trim(pad: int) -> int:
        calls.append(pad)
        return 1

    trimmer = malloc_tuning.Trimmer(fake_trim, 0.01).start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    assert calls[:3] == [0, 0, 0] and trimmer.trims == len(calls)
    assert not trimmer.alive
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n  # stopped means no more trims


def test_start_replaces_the_running_trimmer_and_zero_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(malloc_tuning, "libc_malloc_trim", lambda: lambda pad: 1)
    monkeypatch.setenv(malloc_tuning.ENV, "5.0")  # restored (or removed) after the test
    try:
        first = malloc_tuning.start(30)
        second = malloc_tuning.start(30)
        assert first is not None and second is not None and first is not second
        assert not first.alive and second.alive
        assert os.environ[malloc_tuning.ENV] == "30.0"
        assert malloc_tuning.start(0) is None
        assert not second.alive
        assert os.environ[malloc_tuning.ENV] == "0.0"  # children: no trimmer either
        names = [t.name for t in threading.enumerate()]
        assert "malloc-trim" not in names
    finally:
        malloc_tuning.stop()


def test_out_of_range_intervals_are_refused() -> None:
    for bad in (-1.0, malloc_tuning.MAX_INTERVAL_S + 1):
        with pytest.raises(ValueError, match="trim interval"):
            malloc_tuning.start(bad)
        with pytest.raises(SettingsError, match="malloc_trim_interval_s"):
            Settings(malloc_trim_interval_s=bad)
    assert Settings().malloc_trim_interval_s == 5.0
