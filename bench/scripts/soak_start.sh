# GPU soak, part 1 (repo root, on the GPU machine): start `lipstream serve` (compiled
# backend) and, once /readyz answers, the soak client, both in their own sessions so they
# outlive this command; then wait up to $WAIT seconds. Part 2: soak_collect.sh.
# N: $SOAK_N, else the bench's max_sessions_realtime from /tmp/bench.json, else 12.
set -u
. bench/scripts/device_env.sh
N=${SOAK_N:-$(python3 -c "import json; print(json.load(open('/tmp/bench.json'))['streaming']['compiled']['max_sessions_realtime'] or 12)" 2>/dev/null || echo 12)}
MIN=${SOAK_MIN:-10}
echo "soak: N=$N minutes=$MIN"
setsid nohup python3 -m lipstream serve --engine musetalk --backend compiled --device cuda \
    --max-sessions 48 --port 8000 >/tmp/serve.log 2>&1 </dev/null &
for _ in $(seq 1 400); do curl -sf http://127.0.0.1:8000/readyz >/dev/null && break; sleep 1; done
curl -s http://127.0.0.1:8000/readyz; echo
PID=$(pgrep -f "lipstream serve" | head -1)
echo "server pid $PID"
setsid nohup python3 -m lipstream bench --soak --sessions "$N" --minutes "$MIN" \
    --soak-url http://127.0.0.1:8000 --soak-pid "$PID" --soak-out /tmp/soak.json \
    >/tmp/soak.log 2>&1 </dev/null &
sleep "${WAIT:-420}"
tail -5 /tmp/soak.log; grep -c . /tmp/serve.log
