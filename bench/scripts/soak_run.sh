# GPU soak, the whole run (repo root, on the GPU machine; soak_start.sh runs it in its own
# session so it outlives the device command): set up, start `lipstream serve` (compiled
# backend), wait for /readyz (compile: ~3 min on a fresh machine), then soak N sessions for
# MIN minutes against it from SOAK_CLIENTS client processes (default 3), sampling the RSS of
# the server and its media processes (auto: 4 at --max-sessions=24) and its GPU memory -> /tmp/soak.json.
# The clients time frames without decoding them (SOAK_DECODE=1: decode them too).
# N: $SOAK_N, else the bench's max_sessions_realtime from /tmp/bench.json, else 12.
# SOAK_SPLIT_CPUS=1: the server (and its media processes) on all cores but the last 3, the
# client processes on those 3 (viewers are not on a real server's host).
set -u
. bench/scripts/device_env.sh
N=${SOAK_N:-$(python3 -c "import json; print(json.load(open('/tmp/bench.json'))['streaming']['compiled']['max_sessions_realtime'] or 12)" 2>/dev/null || echo 12)}
MIN=${SOAK_MIN:-10}
SRV=() CLI=()
NCPU=$(nproc)
if [ "${SOAK_SPLIT_CPUS:-0}" = 1 ] && [ "$NCPU" -ge 8 ]; then
    SRV=(taskset -c "0-$((NCPU - 4))") CLI=(taskset -c "$((NCPU - 3))-$((NCPU - 1))")
fi
echo "soak: N=$N minutes=$MIN server cpus=${SRV[*]:-all} client cpus=${CLI[*]:-all} $(date +%T)"
setsid nohup env TORCH_LOGS="${TORCH_LOGS:-recompiles}" LIPSTREAM_MEDIA_LOG_LEVEL="${LIPSTREAM_MEDIA_LOG_LEVEL:-info}" "${SRV[@]}" python3 -m lipstream serve --engine musetalk --backend compiled --device cuda \
    --max-sessions=24 --port=8000 >/tmp/serve.log 2>&1 </dev/null &
for _ in $(seq 1 900); do curl -sf http://127.0.0.1:8000/readyz >/dev/null && break; sleep 1; done
echo "ready: $(curl -s http://127.0.0.1:8000/readyz) $(date +%T)"
PID=$(pgrep -f "lipstream serve" | head -1)
echo "server pid $PID"
"${CLI[@]}" python3 -m lipstream bench --soak --sessions "$N" --minutes "$MIN" \
    --soak-url http://127.0.0.1:8000 --soak-pid "$PID" --soak-clients "${SOAK_CLIENTS:-3}" \
    $([ "${SOAK_DECODE:-0}" = 1 ] && echo --soak-decode || echo --soak-no-decode) --soak-out /tmp/soak.json >/tmp/soak.log 2>&1
echo "soak finished: rc=$? $(date +%T)"
