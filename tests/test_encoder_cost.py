"""bench.gpu.measure.encoder_cost (the bench's `encoders` section) on the CPU, small
frames: aiortc's own VP8 and H.264 encoders as aiortc and as the server set them up, k at
once, and at set codec threads."""

from __future__ import annotations

from bench.gpu.measure import encoder_cost
from server.media import encoder_tuning
from server.settings import EncoderTuning


def test_encoder_cost_reports_each_codec_and_each_vp8_thread_count() -> None:
    res = encoder_cost(
        144, 256, frames=6, threads=(1, 2), vp8_codec_threads=(1, 2), h264_codec_threads=(1, 3)
    )
    assert res["height"] == 144 and res["width"] == 256
    for codec in ("VP8", "H264"):
        r = res[codec]
        assert r["ms_per_frame_1_thread"] > 0
        runs = r["ms_per_frame_1_thread_runs"]  # the figure is the median of 3 runs
        assert len(runs) == 3 and sorted(runs)[1] == r["ms_per_frame_1_thread"]
        assert r["fps_total_1_threads"] > 0 and r["fps_total_2_threads"] > 0
    for codec, counts in (("VP8", {"1", "2"}), ("H264", {"1", "3"})):
        by = res[codec]["by_codec_threads"]
        assert set(by) == counts
        assert all(
            v["ms_per_frame_1_thread"] > 0 and v["fps_total_2_threads"] > 0 for v in by.values()
        )
        srv = res[codec]["server"]
        assert srv["ms_per_frame_1_thread"] > 0 and srv["fps_total_2_threads"] > 0
        assert res[codec]["server_speedup"] > 0
    # the server's defaults are back afterwards
    assert encoder_tuning.applied() == EncoderTuning()
    assert res["server_tuning"] == EncoderTuning().as_dict()
