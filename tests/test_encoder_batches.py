"""The encoder-batch sweep's arithmetic, and a smoke run on the CPU (eager, tiny whisper)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.gpu.encoder_batches import main, step_costs


def test_step_costs_pick_the_cheapest_padding() -> None:
    out = step_costs({1: 0.3, 2: 0.4, 8: 1.4}, most=8)
    table, best = out["ms_for_k_windows"], out["best_batch_for_k"]
    assert table[1] == {1: 0.3, 2: 0.4, 8: 1.4}
    assert table[3] == {1: 0.3 * 3, 2: 0.4 * 2, 8: 1.4}
    assert best[1] == 1 and best[2] == 2 and best[3] == 2
    assert best[8] == 8  # 8 x 0.3 = 2.4 and 4 x 0.4 = 1.6 against 1.4


def test_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "enc.json"
    main([str(out), "--device", "cpu", "--size", "tiny", "--batches", "1,2"])
    res = json.loads(out.read_text())
    assert set(res["calls"]) == {"1", "2"}
    assert all(c["ms_per_call"] > 0 for c in res["calls"].values())
    assert set(res["best_batch_for_k"].values()) <= {1, 2}
