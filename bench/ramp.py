"""The admission ramp: `lipstream bench --ramp --soak-url URL --sessions N --ramp-every S`.

Against a running server, open sessions one at a time, one attempt every `every_s` seconds
(at most `max_sessions` attempts); every admitted session speaks continuously at real time
(`bench.soak`'s utterances) until the ramp ends. Between attempts `GET /readyz` is sampled
about every 0.5 s (the engine's late fraction and the video frames dropped before the
encoders, `server.session.overload`). A refused attempt (`SessionRefused`) is recorded with its
status, reason, detail and Retry-After and the number of sessions open then; after `stop_after_refusals` refusals in a row with reason
"overloaded" (or one "draining") the ramp stops attempting and keeps the admitted sessions
speaking `hold_s` seconds more. At the end each admitted session's server info and the
client's video figures are collected, and all clients are closed. With `client_processes`
> 1 the clients live in that many child processes (`bench.ramp_clients`), so that the
intervals they measure are not those of one GIL-bound process receiving every stream.

The question it answers: how many sessions does the server admit before it starts refusing
them as overloaded, and how did the sessions it admitted fare (late and dropped frames)?
The result is a JSON document (a summary printed, all of it written to `out` where given).
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.ramp_clients import ADMITTED_STATUS, LocalClients, ProcessClients
from bench.soak import _first_ready, first_frame_medians, skip_video_decoding

log = logging.getLogger(__name__)

READYZ_EVERY_S = 0.5
LONG_LISTS = ("attempts", "readyz_samples", "per_session")


async def _readyz(http: httpx.AsyncClient) -> dict[str, Any]:
    """/readyz's body (a draining server answers 503 with a body too); {} where unreachable."""
    try:
        body = (await http.get("/readyz")).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _late_text(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


async def ramp(
    server_url: str,
    every_s: float = 4.0,
    max_sessions: int = 24,
    stop_after_refusals: int = 3,
    hold_s: float = 10.0,
    client_processes: int = 1,
) -> dict[str, Any]:
    """The ramp (see the module docstring); returns its JSON-ready result. `client_processes`
    > 1 spreads the admitted sessions' clients over that many child processes
    (`bench.ramp_clients`)."""
    if every_s <= 0 or max_sessions < 1 or stop_after_refusals < 1 or hold_s < 0:
        raise ValueError(
            "the ramp needs every_s > 0, max_sessions >= 1, stop_after_refusals >= 1, hold_s >= 0"
        )
    if client_processes < 1:
        raise ValueError(f"the ramp needs client_processes >= 1, got {client_processes}")
    clients: LocalClients | ProcessClients | None = None
    attempts: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    first_refused_open: int | None = None
    late_at_first_refusal: float | None = None
    stopped = "max_sessions"
    in_a_row = 0
    t0 = time.monotonic()

    async def sample(http: httpx.AsyncClient) -> tuple[float | None, float | None]:
        """One /readyz sample; (engine-late, video-drop) fractions (None: not judged yet)."""
        body = await _readyz(http)
        late, dropped = body.get("engine_late_fraction"), body.get("video_drop_fraction")
        samples.append(
            {
                "t": round(time.monotonic() - t0, 2),
                "open": clients.admitted if clients else 0,
                "server_sessions": body.get("sessions"),
                "engine_late_fraction": late,
                "video_drop_fraction": dropped,
            }
        )
        return (
            late if isinstance(late, int | float) else None,
            dropped if isinstance(dropped, int | float) else None,
        )

    async def wait_sampling(http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            await sample(http)
            await asyncio.sleep(min(READYZ_EVERY_S, max(0.0, until - time.monotonic())))

    try:
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as http:
            avatar_id = await _first_ready(http)
            ready = await _readyz(http)
            if client_processes > 1:
                clients = ProcessClients(server_url, avatar_id, client_processes)
                await clients.start()
            else:
                clients = LocalClients(server_url, avatar_id)
            t0 = time.monotonic()
            for attempt in range(1, max_sessions + 1):
                late, dropped = await sample(http)
                t = time.monotonic() - t0
                open_before = clients.admitted
                row: dict[str, Any] = {
                    "t": round(t, 2),
                    "attempt": attempt,
                    "open_before": open_before,
                    "engine_late_fraction_before": late,
                    "video_drop_fraction_before": dropped,
                    **await clients.open(attempt, t),
                }
                if row["status"] == ADMITTED_STATUS:
                    in_a_row = 0
                elif row["reason"] == "overloaded":
                    in_a_row += 1
                    if first_refused_open is None:
                        first_refused_open, late_at_first_refusal = open_before, late
                else:
                    in_a_row = 0
                attempts.append(row)
                print(
                    f"ramp: attempt {attempt}, {open_before} open, late {_late_text(late)}, "
                    f"dropped {_late_text(dropped)} -> "
                    f"{row['status']}" + (f" {row['reason']}" if row["reason"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
                if in_a_row >= stop_after_refusals:
                    stopped = "overloaded"
                    break
                if row["reason"] == "draining":  # the server is going away: nothing to learn
                    stopped = "draining"
                    break
                if attempt < max_sessions:
                    await wait_sampling(http, t0 + attempt * every_s)
            await wait_sampling(http, time.monotonic() + hold_s)
            admitted = clients.admitted
            per = await clients.finish(http)
            duration = time.monotonic() - t0
    finally:
        if clients is not None:
            await clients.close()
    reasons = Counter(
        a["reason"] or f"http_{a['status']}" for a in attempts if a["status"] != ADMITTED_STATUS
    )
    return {
        "server_url": server_url,
        "engine": ready.get("engine"),
        "admit_max_late": ready.get("admit_max_late"),
        "every_s": every_s,
        "max_sessions": max_sessions,
        "stop_after_refusals": stop_after_refusals,
        "hold_s": hold_s,
        "stopped": stopped,  # max_sessions (all attempts made), overloaded or draining
        "duration_s": round(duration, 1),
        "client_processes": client_processes,
        "admitted": admitted,
        "first_refused_open": first_refused_open,
        "engine_late_fraction_at_first_refusal": late_at_first_refusal,
        "refusal_reasons": dict(reasons),
        "engine_late_frames": sum(int(p["engine_late_frames"] or 0) for p in per),
        "frames_dropped": sum(int(p["frames_dropped"] or 0) for p in per),
        **_what_they_saw(per),
        "attempts": attempts,
        "readyz_samples": samples,
        "per_session": per,
    }


def _what_they_saw(per: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the admitted sessions were clean, not only admitted: their speaking frames,
    held ticks and frames missing at the clients, summed, and their p99 frame intervals
    (median and worst of the sessions; None without any)."""
    p99 = sorted(p["frame_interval_ms_p99"] for p in per if p["frame_interval_ms_p99"] is not None)
    return {
        "speech_frames": sum(int(p["speech_frames"] or 0) for p in per),
        "held_frames": sum(int(p["held_frames"] or 0) for p in per),
        "frames_missing_at_client": sum(int(p["frames_missing_at_client"] or 0) for p in per),
        "frame_interval_ms_p99_median": statistics.median(p99) if p99 else None,
        "frame_interval_ms_p99_max": p99[-1] if p99 else None,
        # the first frames (a session opened late spoke under the most load)
        **first_frame_medians(per),
    }


def run_ramp(url: str, out: Path | None = None, **opts: Any) -> dict[str, Any]:
    """The ramp against `url` (options: `ramp`'s); prints a summary (without the long lists)
    and writes all of it as JSON to `out`. The clients only time frames (no video decoding)."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # aiortc's closing-task noise
    for name in ("aioice", "aiortc", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    skip_video_decoding()  # this process is only the ramp's clients
    result = asyncio.run(ramp(url, **opts))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k not in LONG_LISTS}
    print(json.dumps(summary, indent=2))
    return result
