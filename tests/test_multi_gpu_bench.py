"""`python -m bench.multi_gpu` over modelled GPUs (CPU only: a check of the harness, not a
measurement): sessions are split evenly by the server's Placer, every device's run is judged
against the streaming bar, and the 1-GPU and k-GPU figures and their ratio come out."""

from __future__ import annotations

import json
from pathlib import Path

from bench.multi_gpu import main


def test_the_sweep_places_runs_and_compares(tmp_path: Path) -> None:
    out = tmp_path / "multi.json"
    main(
        [
            str(out),
            "--modelled",
            "h200-2026-12-01",
            "--devices",
            "2",
            "--per-gpu",
            "1,3",
            "--seconds",
            "2",
        ]
    )
    res = json.loads(out.read_text())
    assert set(res["points"]) == {"1", "2"}
    two = res["points"]["2"]
    assert set(two) == {"2", "6"}
    assert two["6"]["per_device"] == {"modelled:0": 3, "modelled:1": 3}
    assert set(two["6"]["runs"]) == {"modelled:0", "modelled:1"}
    for point in (*res["points"]["1"].values(), *two.values()):
        assert point["frames_missing"] == 0 and point["holds"], point
    assert res["max_sessions"] == {"1": 3, "2": 6}
    assert res["scaling"] == 1.0
    assert res["first_frame_ms_p50"]["2"] is not None
