# GPU admission ramp (repo root, on the GPU machine, with the server of soak_run.sh already up
# at http://127.0.0.1:8000): open one more speaking session every $RAMP_EVERY s (default 4),
# at most $RAMP_N attempts (default 24), until the server refuses 3 in a row as "overloaded"
# (bench.ramp), its clients spread over $RAMP_CLIENTS processes (default 3, as the soak's);
# /tmp/ramp.json goes to $OUT. Prints each attempt: t, sessions open before it,
# the answer's status and reason, and the engine's late fraction (/readyz) just before.
set -u
export PYTHONPATH=/tmp/site:$PWD
curl -sf http://127.0.0.1:8000/readyz >/dev/null || { echo "no ready server at 127.0.0.1:8000 (start soak_run.sh first)"; exit 3; }
CLI=()
NCPU=$(nproc)
if [ "${SOAK_SPLIT_CPUS:-0}" = 1 ] && [ "$NCPU" -ge 8 ]; then  # as soak_run.sh: clients on the last 3 cores
    CLI=(taskset -c "$((NCPU - 3))-$((NCPU - 1))")
fi
"${CLI[@]}" python3 -m lipstream bench --ramp --soak-url http://127.0.0.1:8000 --sessions "${RAMP_N:-24}" \
    --ramp-every "${RAMP_EVERY:-4}" --soak-clients "${RAMP_CLIENTS:-3}" --soak-out /tmp/ramp.json
echo "ramp finished: rc=$? $(date +%T)"
cp /tmp/ramp.json "$OUT"/ 2>/dev/null
python3 -c "import json; d=json.load(open('/tmp/ramp.json')); [print(f\"t={a['t']:6.1f} open={a['open_before']:2d} {a['status']} {a['reason'] or '-':10s} late={'n/a' if a['engine_late_fraction_before'] is None else format(a['engine_late_fraction_before'], '.1%')} dropped={'n/a' if a.get('video_drop_fraction_before') is None else format(a['video_drop_fraction_before'], '.1%')}\") for a in d['attempts']]"
python3 -c "import json; d=json.load(open('/tmp/ramp.json')); print({k: d.get(k) for k in ('admitted', 'speech_frames', 'engine_late_frames', 'held_frames', 'frames_missing_at_client', 'frame_interval_ms_p99_median', 'frame_interval_ms_p99_max')})" 2>&1
