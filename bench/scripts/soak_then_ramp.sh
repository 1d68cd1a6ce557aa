# GPU soak then admission ramp in ONE device call (repo root, GPU machine): soak_run.sh starts
# `lipstream serve` (compiled backend, --max-sessions 24), waits for /readyz (~4 min on a fresh
# machine) and soaks SOAK_N (default 16) sessions for SOAK_MIN minutes (default 1.5); the same
# server then gets ramp.sh (one more speaking session every RAMP_EVERY s, default 3). JSONs and
# the server's log to $OUT.
set -u
SOAK_N=${SOAK_N:-16} SOAK_MIN=${SOAK_MIN:-1.5} SOAK_SPLIT_CPUS=${SOAK_SPLIT_CPUS:-0} bash bench/scripts/soak_run.sh
cp /tmp/soak.json /tmp/soak.log "$OUT"/ 2>/dev/null
python3 -c "import json; d=json.load(open('/tmp/soak.json')); print(json.dumps({k: v for k, v in d.items() if k not in ('per_session', 'samples')}))" 2>&1 | cut -c1-3000
RAMP_EVERY=${RAMP_EVERY:-3} SOAK_SPLIT_CPUS=${SOAK_SPLIT_CPUS:-0} bash bench/scripts/ramp.sh
tail -c 300000 /tmp/serve.log >"$OUT"/serve.log
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
