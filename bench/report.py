"""The short table `lipstream bench` prints last: one row per figure worth reading at a glance
(the JSON has everything)."""

from __future__ import annotations

from typing import Any, TextIO

Row = tuple[str, Any]

# a streaming point's figures in its row
STREAM_KEYS = (
    "delivered_fps_min",
    "frame_interval_ms_p99",
    "first_frame_ms_p50",
    "first_frame_ms_p99",
    "late_frames_by_lead",
    "held_frames_by_lead",
    "batch_mean",
    "holds_realtime",
)


def print_table(res: dict[str, Any], fh: TextIO) -> None:
    """The bench result `res` as `name value` lines on `fh`."""
    rows = [
        ("gpu", (res.get("setup") or {}).get("gpu")),
        *_offline_rows(res),
        *_streaming_rows(res.get("streaming") or {}),
        *_encoder_rows(res.get("encoders") or {}),
    ]
    for name, val in rows:
        print(f"{name:40s} {round(val, 2) if isinstance(val, float) else val}", file=fh)


def _dicts(section: Any) -> list[tuple[str, dict[str, Any]]]:
    """A section's entries that are dicts (not its `section_s`, an error text, ...)."""
    if not isinstance(section, dict):
        return []
    return [(k, v) for k, v in section.items() if isinstance(v, dict)]


def _offline_rows(res: dict[str, Any]) -> list[Row]:
    ref = (res.get("reference") or {}).get("fps")
    rows: list[Row] = [("musetalk-reference fps", ref)]
    for k, v in _dicts(res.get("pipeline")):
        if "fps" in v:
            rows.append((f"full pipeline {k} fps", v["fps"]))
            if ref:
                rows.append((f"full pipeline {k} x reference", v["fps"] / ref))
    rows += [(f"render {k} fps", v["fps"]) for k, v in _dicts(res.get("render")) if "fps" in v]
    for k, v in _dicts(res.get("offline")):
        fps = {b: round(x["fps"]) for b, x in v.items() if isinstance(x, dict) and "fps" in x}
        rows.append((f"offline {k}", fps))
    rows += [
        (f"accuracy {k} max/mean", (v["max"], round(v["mean"], 4)))
        for k, v in _dicts(res.get("accuracy"))
        if "max" in v
    ]
    return rows


def _streaming_rows(streaming: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for variant, st in _dicts(streaming):
        for k, v in _dicts(st):
            if "sessions" in v:
                figures = {
                    x: round(v[x], 1) if isinstance(v[x], float) else v[x] for x in STREAM_KEYS
                }
                rows.append((f"stream {variant} N={k}", figures))
        lat = st.get("latency_1_session") or {}
        first = (lat.get("first_frame_ms_p50"), lat.get("first_frame_ms_p99"))
        rows += [
            (f"stream {variant} 1-session first frame p50/p99", first),
            (f"stream {variant} max sessions realtime", st.get("max_sessions_realtime")),
            (f"stream {variant} max sessions, p99 <= 60 ms", st.get("max_sessions_streaming_bar")),
        ]
    return rows


def _encoder_rows(encoders: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for k in ("VP8", "H264"):
        e = encoders.get(k)
        if not isinstance(e, dict):
            continue
        rows.append((f"aiortc {k} ms/frame, cores/session", _cost(e)))
        if e.get("server"):
            rows.append((f"server's {k} ms/frame, cores/session", _cost(e["server"])))
    return rows


def _cost(e: dict[str, Any]) -> tuple[float, float]:
    return round(e["ms_per_frame_1_thread"], 2), round(e["cores_per_25fps_session"], 3)
