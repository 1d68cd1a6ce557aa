"""`lipstream bench` variant names -> GPU pipeline options (parsed on any machine)."""

from __future__ import annotations

import pytest

from bench.options import variant_options


def test_plain_compiled_has_the_server_defaults() -> None:
    o = variant_options("compiled", (2, 4))
    assert (o.backend, o.buckets, o.output) == ("compiled", (2, 4), "i420")
    assert o.fold_upsample and o.compile_encoder and o.nhwc_norm and o.log_mel_in_graph
    assert o.encoder_batch == 4
    assert not variant_options("compiled-stocknorm", (2,)).nhwc_norm


def test_flags_combine() -> None:
    o = variant_options("compiled-nofold-eagerenc-nhwcnorm-enc2", (4,))
    assert not o.fold_upsample and not o.compile_encoder
    assert o.nhwc_norm and o.encoder_batch == 2
    assert variant_options("compiled-melgraph", (4,)).log_mel_in_graph
    assert not variant_options("compiled-eagermel", (4,)).log_mel_in_graph
    assert variant_options("compiled-enc1", (4,)).encoder_batch == 1
    with pytest.raises(ValueError, match="encoder_batch"):
        variant_options("compiled-enc0", (4,))
    assert variant_options("compiled-encsteps", (4,)).encoder_batches == (1, 2, 4, 8)
    assert variant_options("compiled", (4,)).encoder_batches == ()
    with pytest.raises(ValueError, match="encoder_batches needs the compiled backend"):
        variant_options("torch-encsteps", (4,))
    with pytest.raises(ValueError, match="encoder_batches needs the compiled backend"):
        variant_options("compiled-eagerenc-encsteps", (4,))


@pytest.mark.parametrize(
    "name",
    # the last four name switches that left the pipeline: a clear error, not a silent default
    ["compiled-fast", "compiled-crop8", "compiled-split", "compiled-tuned", "compiled-cpaste"],
)
def test_unknown_flags_are_refused(name: str) -> None:
    flag = name.split("-")[1]
    with pytest.raises(ValueError, match=f"unknown bench variant '{flag}'.*flags are nofold"):
        variant_options(name, (4,))


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend"):
        variant_options("onnx", (4,))


def test_launch_phase_means_per_step_since_the_start() -> None:
    from types import SimpleNamespace

    from bench.simulation import phase_means

    pipeline = SimpleNamespace(launch_s={"features": 1.5, "paste": 0.9})
    sched = SimpleNamespace(pipeline=pipeline)
    before = {"features": 1.0, "paste": 0.5}
    assert phase_means(sched, before, 100) == {"features": 5.0, "paste": 4.0}
    assert phase_means(sched, before, 0) is None
    assert phase_means(SimpleNamespace(), {}, 10) is None  # no GPU pipeline


def test_unknown_sections_are_refused() -> None:
    from bench.options import BenchOptions

    assert BenchOptions(sections=("pipeline", "accuracy")).sections == ("pipeline", "accuracy")
    with pytest.raises(ValueError, match="unknown sections \\['full_pipeline'\\]"):
        BenchOptions(sections=("full_pipeline",))
    with pytest.raises(ValueError, match="unknown sections \\['vae_crop'\\]"):
        BenchOptions(sections=("vae_crop",))


def test_unknown_variant_flags_fail_at_the_options() -> None:
    from bench.options import BenchOptions

    with pytest.raises(ValueError, match="unknown bench variant 'split'"):
        BenchOptions(backends=("torch", "compiled-split"))
    with pytest.raises(ValueError, match="unknown bench variant 'tuned'"):
        BenchOptions(stream_backends=("compiled-tuned-gather20",))


def test_offline_options_are_checked() -> None:
    from bench.options import BenchOptions

    assert BenchOptions(buckets=(48,), rounds=3, clip_s=19.2).buckets == (48,)
    for bad in ((), (48, 16), (0, 4), (4, 4)):
        with pytest.raises(ValueError, match="buckets must be"):
            BenchOptions(buckets=bad)
    with pytest.raises(ValueError, match="rounds must be"):
        BenchOptions(rounds=0)
    with pytest.raises(ValueError, match="clip_s positive"):
        BenchOptions(clip_s=0)


def test_stream_runs_keep_the_long_sessions_point_without_a_long_run() -> None:
    """`--long-s 0` keeps the 20-session point in the first backend's sweep."""
    from bench.options import BenchOptions, stream_runs

    o = BenchOptions(sessions=(1, 16, 20), long_sessions=20, long_s=0, sweep_s=12)
    assert stream_runs(o, long_run=True) == [(1, 12), (16, 12), (20, 12)]
    o = BenchOptions(sessions=(1, 16, 20), long_sessions=20, long_s=60, sweep_s=12)
    assert stream_runs(o, long_run=True) == [(1, 12), (16, 12), (20, 60)]
    assert stream_runs(o, long_run=False) == [(1, 12), (16, 12), (20, 12)]


def test_phase_spread_is_a_checked_bench_option() -> None:
    from bench.options import BenchOptions

    assert BenchOptions().phase_spread_s == 0.02
    assert BenchOptions(phase_spread_s=0.04).phase_spread_s == 0.04
    with pytest.raises(ValueError, match="phase_spread_s"):
        BenchOptions(phase_spread_s=-0.01)


def test_gather_is_a_bench_option() -> None:
    from bench.options import BenchOptions

    assert BenchOptions(gather_s=0.02).gather_s == 0.02
    with pytest.raises(ValueError, match="gather_s"):
        BenchOptions(gather_s=-1.0)


def test_a_streaming_variant_can_name_its_gather() -> None:
    from bench.options import split_gather

    assert split_gather("compiled-gather20") == ("compiled", 0.02)
    assert split_gather("compiled-stocknorm-gather5") == ("compiled-stocknorm", 0.005)
    assert split_gather("compiled") == ("compiled", None)
    for bad in ("compiled-gather", "compiled-gatherX", "compiled-gather5-gather10"):
        with pytest.raises(ValueError, match="gather"):
            split_gather(bad)


def test_the_table_reads_a_result() -> None:
    """`bench.report.print_table` on a result with every section's shape (and an errored one)."""
    import io

    from bench.report import STREAM_KEYS, print_table

    res = {
        "setup": {"gpu": "H100"},
        "reference": {"fps": 100.0},
        "pipeline": {"compiled": {"fps": 550.0}, "section_s": 3.0},
        "offline": {"compiled": {"1": {"fps": 180.4}, "48": {"fps": 470.6}}},
        "accuracy": {"compiled_vs_eager": {"max": 3.0, "mean": 0.01234}},
        "render": {"error": "RuntimeError: no GPU"},
        "streaming": {
            "compiled": {
                "16": {"sessions": 16, **dict.fromkeys(STREAM_KEYS, 1.25)},
                "latency_1_session": {"first_frame_ms_p50": 110.0, "first_frame_ms_p99": 130.0},
                "max_sessions_realtime": 16,
                "max_sessions_streaming_bar": 20,
            }
        },
        "encoders": {"VP8": {"ms_per_frame_1_thread": 13.31, "cores_per_25fps_session": 0.333}},
    }
    out = io.StringIO()
    print_table(res, out)
    lines = out.getvalue().splitlines()

    def row(name: str) -> str:
        (line,) = [x for x in lines if x.startswith(name + " ")]
        return line[len(name) :].strip()

    assert row("gpu") == "H100"
    assert row("full pipeline compiled x reference") == "5.5"
    assert row("offline compiled") == "{'1': 180, '48': 471}"
    assert row("accuracy compiled_vs_eager max/mean") == "(3.0, 0.0123)"
    assert row("stream compiled max sessions, p99 <= 60 ms") == "20"
    assert "'batch_mean': 1.2" in row("stream compiled N=16")
    assert row("aiortc VP8 ms/frame, cores/session") == "(13.31, 0.333)"
    assert not any(x.startswith("render") for x in lines)
