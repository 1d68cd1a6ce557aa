# The codecs' set-up end to end on the CPU (repo root; no GPU): `lipstream serve` (preview
# engine, MEDIA media processes, default 2) with a 1280x720 photo avatar (scikit-image's
# astronaut on a flat background), a soak of N sessions (default 3) for MIN minutes (default 2)
# from 2 client processes that do not decode, once with aiortc's set-up (VP8 denoiser, x264
# medium, the libraries' threads) and once with the server's defaults. The soak JSONs and the
# media processes' stats lines go to OUT (default /tmp/soak_encoders).
set -u
N=${N:-3} MIN=${MIN:-2} MEDIA=${MEDIA:-2} OUT=${OUT:-/tmp/soak_encoders} PORT=${PORT:-8011}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" - "$OUT/avatar.png" <<'PYEOF'
import sys, cv2, numpy as np
from skimage import data
canvas = np.empty((720, 1280, 3), np.uint8); canvas[:] = (90, 60, 40)
canvas[:, 280:1000] = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (720, 720))
cv2.imwrite(sys.argv[1], canvas)
PYEOF
run() {  # NAME, then the settings as VAR=VALUE
    local name=$1; shift
    local dir; dir=$(mktemp -d)
    env "$@" LIPSTREAM_MEDIA_LOG_LEVEL=info "$PY" -m lipstream serve --engine preview \
        --avatars-dir "$dir/avatars" --no-demo-avatar --max-sessions=8 --port "$PORT" \
        --set media_processes="$MEDIA" >"$OUT/serve_$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
    curl -s -F file=@"$OUT/avatar.png" -F name=wide "http://127.0.0.1:$PORT/v1/avatars" >/dev/null
    for _ in $(seq 1 120); do
        curl -s "http://127.0.0.1:$PORT/v1/avatars" | grep -q '"status":"ready"' && break; sleep 1
    done
    echo "$name: server $pid ready $(date +%T)"
    "$PY" -m lipstream bench --soak --sessions "$N" --minutes "$MIN" \
        --soak-url "http://127.0.0.1:$PORT" --soak-pid "$pid" --soak-clients 2 --soak-no-decode \
        --soak-out "$OUT/soak_$name.json" >"$OUT/soak_$name.log" 2>&1
    echo "$name: soak rc=$? $(date +%T)"
    kill -INT "$pid"; wait "$pid" 2>/dev/null
    rm -rf "$dir"
}
run aiortc LIPSTREAM_VIDEO_ENCODER_THREADS=0 LIPSTREAM_VP8_NOISE_SENSITIVITY=4 \
    LIPSTREAM_H264_ENCODER_THREADS=0 LIPSTREAM_H264_PRESET=medium
run server LIPSTREAM_UNUSED=0
for f in "$OUT"/serve_*.log; do echo "$f"; grep -h "encodes" "$f" | tail -n 6; done
