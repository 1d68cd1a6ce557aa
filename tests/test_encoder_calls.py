"""Splitting a step's whisper windows over encoder calls of several batch sizes
(`engines.pipeline.encoder_calls`), and the featurizer encoding by such a plan (CPU: the
tiny random whisper, eager; the compiled encoder's graphs per batch are the GPU tests')."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.musetalk.audio_features import AudioFeaturizer
from engines.musetalk.weights import load_whisper
from engines.pipeline.encoder_calls import plan_calls
from engines.pipeline.features import GpuFeaturizer

H200_MS = {1: 0.44, 2: 0.53, 4: 0.81, 8: 1.33}  # measured per call (docs/benchmarks.md)


def brute_force(n: int, costs: dict[int, float]) -> float:
    """The least total cost of calls covering n windows, by trying every multiset."""
    best = float("inf")
    for k in range(1, n + 1):
        for calls in itertools.combinations_with_replacement(sorted(costs), k):
            if sum(calls) >= n and sum(calls) - min(calls) < n:  # no call wholly padding
                best = min(best, sum(costs[b] for b in calls))
    return best


def test_the_measured_costs_pick_the_cheapest_calls() -> None:
    assert plan_calls(0, H200_MS) == ()
    assert plan_calls(1, H200_MS) == (1,)
    assert plan_calls(2, H200_MS) == (2,)  # 0.53 ms, where the fixed batch 4 pays 0.81
    assert plan_calls(3, H200_MS) == (4,)  # one padded call beats 2 + 1 (0.97 ms)
    assert plan_calls(5, H200_MS) == (4, 1)  # 1.25 ms against 1.33 for one call of 8
    assert plan_calls(6, H200_MS) == (8,)
    assert plan_calls(17, H200_MS) == (8, 8, 1)
    costs = {1: 1.0, 2: 2.0}  # a tie: fewer calls
    assert plan_calls(4, costs) == (2, 2)


def test_plans_are_optimal_and_cover_the_windows() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = sorted(rng.choice([1, 2, 3, 4, 6, 8], size=int(rng.integers(1, 4)), replace=False))
        costs = {int(b): float(rng.uniform(0.1, 2.0)) for b in sizes}
        for n in range(1, 13):
            plan = plan_calls(n, costs)
            assert sum(plan) >= n and sum(plan) - min(plan) < n, (n, costs, plan)
            assert list(plan) == sorted(plan, reverse=True)
            total = sum(costs[b] for b in plan)
            assert total == pytest.approx(brute_force(n, costs)), (n, costs, plan)


def test_bad_costs_are_refused() -> None:
    for costs in ({}, {0: 1.0}, {2: -1.0}):
        with pytest.raises(ValueError, match="costs"):
            plan_calls(3, costs)
    with pytest.raises(ValueError, match="n must be"):
        plan_calls(-1, H200_MS)


@pytest.fixture(scope="module")
def base(tiny_models_dir: Path) -> AudioFeaturizer:
    encoder, extractor = load_whisper(tiny_models_dir, "cpu", torch.float32)
    return AudioFeaturizer(encoder, extractor)


@pytest.mark.parametrize("count", [1, 2, 5, 11])
def test_encoding_by_a_plan_gives_the_fixed_batch_features(
    base: AudioFeaturizer, count: int
) -> None:
    """The same features whatever calls the windows went out in; the calls are the plan's."""
    rng = np.random.default_rng(count)
    w = int(base.window_samples)
    segments = [
        (0.3 * rng.standard_normal(int(rng.integers(1, w)))).astype(np.float32)
        for _ in range(count)
    ]
    fixed = GpuFeaturizer(base)
    planned = GpuFeaturizer(base)
    planned.plan = lambda n: plan_calls(n, H200_MS)
    calls: list[int] = []
    run = planned.run_windows

    def counted(wave: torch.Tensor) -> torch.Tensor:
        calls.append(int(wave.shape[0]))
        return run(wave)

    planned.run_windows = counted
    want = fixed.encode(segments)
    got = planned.encode(segments)
    assert tuple(calls) == plan_calls(count, H200_MS)
    assert got.shape == want.shape == (count, 100, 5, 384)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fixed.call_sizes(count) == [4] * -(-count // 4)
