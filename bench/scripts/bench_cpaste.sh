# Issue 4, host time of the paste stage: the streaming bench with the default pipeline and the
# `compiled-cpaste` variant (paste stage as one torch.compile graph), 1 and 12 sessions, on the
# GPU machine (repo root). Each run's JSON carries launch_ms_mean and launch_phase_ms_mean.
# Output: $OUT/bench_cpaste.json (+ the log). Two compiled warm-ups: ~8 minutes on a fresh machine.
. bench/scripts/device_env.sh
timeout "${LIMIT:-560}" python3 -m engines.bench --sections streaming \
    --stream-backends compiled,compiled-cpaste --sessions "${SESSIONS:-1,12}" --long-s 0 \
    --sweep-s "${SWEEP_S:-12}" --out "${OUT:-/tmp}/bench_cpaste.json" >"${OUT:-/tmp}/bench_cpaste.log" 2>&1
echo "bench rc=$?"
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_cpaste.json")))
for name, st in (d.get("streaming") or {}).items():
    for key, run in st.items():
        if isinstance(run, dict) and "launch_phase_ms_mean" in run:
            print(name, key, run.get("delivered_fps_min"), run.get("frame_interval_ms_p99"),
                  run.get("launch_ms_mean"), run.get("launch_phase_ms_mean"))
PY
tail -3 "${OUT:-/tmp}/bench_cpaste.log"
