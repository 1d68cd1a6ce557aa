# GPU soak then admission ramp in ONE device call (repo root, GPU machine): soak_run.sh starts
# `lipstream serve` (compiled backend, --max-sessions=24), waits for /readyz (~4 min on a fresh
# machine) and soaks SOAK_N (default 16) sessions for SOAK_MIN minutes (default 1.5); the same
# server then gets ramp.sh (one more speaking session every RAMP_EVERY s, default 3). JSONs and
# the server's log to $OUT.
# ENCODERS=1 (default): first, on the quiet host, aiortc's encoders as aiortc and as the server
# set them up, and by codec threads (bench.gpu.measure.encoder_cost, ~25 s) -> $OUT/encoders.json.
set -u
if [ "${ENCODERS:-1}" = 1 ]; then
    . bench/scripts/device_env.sh
    python3 -c "
import json, os
from bench.gpu.measure import encoder_cost
r = encoder_cost(720, 1280, frames=40, threads=(1, 8, 16))
open(os.path.join(os.environ['OUT'], 'encoders.json'), 'w').write(json.dumps(r, indent=1))
def nums(d, nd=1):  # the figures only (each run's ms are a list)
    return {k: round(v, nd) for k, v in d.items() if isinstance(v, (int, float))}
for c in ('VP8', 'H264'):
    print(c, 'aiortc', nums(r[c]), 'server', nums(r[c]['server']),
          {t: nums(x, 0) for t, x in r[c]['by_codec_threads'].items()})
"
fi
SOAK_N=${SOAK_N:-16} SOAK_MIN=${SOAK_MIN:-1.5} SOAK_SPLIT_CPUS=${SOAK_SPLIT_CPUS:-0} bash bench/scripts/soak_run.sh
cp /tmp/soak.json /tmp/soak.log "$OUT"/ 2>/dev/null
python3 -c "import json; d=json.load(open('/tmp/soak.json')); print(json.dumps({k: v for k, v in d.items() if k not in ('per_session', 'samples')}))" 2>&1 | cut -c1-3000
RAMP_EVERY=${RAMP_EVERY:-3} SOAK_SPLIT_CPUS=${SOAK_SPLIT_CPUS:-0} bash bench/scripts/ramp.sh
tail -c 300000 /tmp/serve.log >"$OUT"/serve.log
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
