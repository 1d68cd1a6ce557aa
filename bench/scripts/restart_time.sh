# How long `lipstream serve` (compiled backend) takes to be ready, cold and then again with the
# inductor cache the first start left (repo root, GPU machine, one device call, ~7 min).
# Each start's log to $OUT/serve_<n>.log; one line per start: its warm_up_s and the seconds
# from launch to /readyz 200.
set -u
. bench/scripts/device_env.sh
for n in 1 2; do
    t0=$(date +%s.%N)
    python3 -m lipstream serve --engine musetalk --backend compiled --device cuda \
        --port 8000 >"${OUT:-/tmp}/serve_$n.log" 2>&1 </dev/null &
    pid=$!
    for _ in $(seq 1 600); do curl -sf http://127.0.0.1:8000/readyz >/dev/null && break; sleep 1; done
    ready=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
    warm=$(grep -o "warm_up_s=[0-9.]*" "${OUT:-/tmp}/serve_$n.log" | tail -1)
    echo "start $n: ready after ${ready} s, $warm, cache $(du -sh "${LIPSTREAM_CACHE_DIR:-$HOME/.cache/lipstream}" 2>/dev/null | cut -f1)"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
done
