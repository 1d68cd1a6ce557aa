"""How one step's whisper windows are split into encoder calls.

By default the encoder runs at one fixed batch (`PipelineOptions.encoder_batch`) and a step's
windows are padded up to a multiple of it. With `encoder_batches` the compiled encoder holds a
CUDA graph per batch size and times each at warm-up; a step's n windows then go out as the calls
whose measured times add up to the least, each padded up to its own batch: with the H200's
0.44 / 0.53 / 0.81 / 1.33 ms at 1 / 2 / 4 / 8 windows, 2 windows are one call of 2 and 5 windows
a call of 4 and one of 1, where the fixed batch 4 would pay 0.81 and 1.62 ms.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping


def plan_calls(n: int, costs: Mapping[int, float]) -> tuple[int, ...]:
    """The batch sizes (largest first) of the calls that encode `n` windows at the least total
    cost, `costs` being each batch size's time per call; ties go to fewer calls. () for n 0."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not costs or any(b < 1 or c < 0 for b, c in costs.items()):
        raise ValueError(f"costs need batch sizes >= 1 and times >= 0, got {dict(costs)}")
    return _plan(n, tuple(sorted(costs.items())))


@functools.lru_cache(maxsize=1024)
def _plan(n: int, costs: tuple[tuple[int, float], ...]) -> tuple[int, ...]:
    # best[m]: (total cost, calls, the batch of the last call) to cover m windows
    best: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    for m in range(1, n + 1):
        best.append(
            min((best[max(0, m - b)][0] + c, best[max(0, m - b)][1] + 1, b) for b, c in costs)
        )
    calls = []
    m = n
    while m > 0:
        b = best[m][2]
        calls.append(b)
        m = max(0, m - b)
    return tuple(sorted(calls, reverse=True))
