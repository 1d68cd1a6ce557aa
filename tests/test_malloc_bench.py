"""`lipstream bench --malloc`: the allocator strategies measured in fresh interpreters, JSON out.
Only what cannot depend on the machine's speed is asserted (what each leaves resident)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")


def test_malloc_bench_reports_every_strategy(tmp_path: Path) -> None:
    out = tmp_path / "malloc.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lipstream", "bench", "--malloc", "--malloc-frames", "1000",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "malloc bench: trim-1s" in proc.stderr  # progress on stderr, JSON on stdout
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    got = report["strategies"]
    assert set(got) == {"glibc-default", "mmap-threshold-256k", "trim-1s"}
    assert all(r["cpu_ms_per_frame"] > 0 for r in got.values())
    assert got["glibc-default"]["cpu_vs_default"] == 1.0
    assert got["glibc-default"]["burst_kept_mb"] > 50  # the freed burst stays (276 MB)
    assert got["mmap-threshold-256k"]["burst_kept_mb"] < 20
    assert got["trim-1s"]["burst_kept_mb"] < 20 and got["trim-1s"]["trims"] >= 1


def test_malloc_bench_refuses_too_few_frames() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lipstream", "bench", "--malloc", "--malloc-frames", "10"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "frames must be >= 1000" in proc.stderr
