# The streaming bench for pipeline variants side by side, on the GPU machine (repo
# root). BACKENDS (default compiled,compiled-eagermel; e.g. compiled,compiled-enc1 or
# compiled,compiled-nhwcnorm), SESSIONS (default 1,12), SWEEP_S, GATHER_MS (the scheduler's
# gather_s in ms, default 20 as the server; per variant: compiled-gather0), PHASE_SPREAD_MS
# (the sessions' start spread, default 20; 40: their frames' phases at random). Each run's JSON carries
# launch_ms_mean and launch_phase_ms_mean. Output: $OUT/bench_stream.json (+ the log). One
# compiled warm-up per variant: ~4 minutes each on a fresh machine.
. bench/scripts/device_env.sh
timeout "${LIMIT:-560}" python3 -m bench.runner --sections streaming \
    --stream-backends "${BACKENDS:-compiled,compiled-eagermel}" --sessions "${SESSIONS:-1,12}" \
    --long-s 0 --sweep-s "${SWEEP_S:-12}" --gather-ms "${GATHER_MS:-20}" --phase-spread-ms "${PHASE_SPREAD_MS:-20}" --out "${OUT:-/tmp}/bench_stream.json" \
    >"${OUT:-/tmp}/bench_stream.log" 2>&1
echo "bench rc=$?"
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_stream.json")))
for name, st in (d.get("streaming") or {}).items():
    if not isinstance(st, dict):
        continue
    for key, run in st.items():
        if isinstance(run, dict) and "launch_phase_ms_mean" in run:
            print(name, key, run.get("delivered_fps_min"), run.get("frame_interval_ms_p99"),
                  "late by lead", run.get("late_frames_by_lead"), "held", run.get("held_frames_by_lead"),
                  "lateness p99/max", run.get("frame_lateness_ms_p99"), run.get("frame_lateness_ms_max"),
                  "batch", run.get("batch_mean"), "launch", run.get("launch_ms_mean"),
                  run.get("launch_phase_ms_mean"))
    print(name, "max sessions realtime", st.get("max_sessions_realtime"), "streaming bar", st.get("max_sessions_streaming_bar"),
          "by playout lead 0-3 frames", st.get("max_sessions_by_lead"), "by held", st.get("max_sessions_by_held_lead"))
PY
tail -3 "${OUT:-/tmp}/bench_stream.log"
