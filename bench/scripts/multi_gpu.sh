# Sessions at 1 GPU and at every GPU of the machine (python -m bench.multi_gpu), on a
# multi-GPU device machine (repo root). PER_GPU (default 12,16,20,24), SECONDS_EACH (default 20),
# GATHER_MS (default 20, as the server). Output: $OUT/multi_gpu.json (+ the log); prints the
# most sessions held at 1 and k GPUs, their first-frame p50 and the scaling (the bar: >= 0.9).
# One compiled warm-up per GPU (the first fills the caches): ~4 minutes, then about 1 each.
. bench/scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${LIMIT:-560}" python3 -m bench.multi_gpu "${OUT:-/tmp}/multi_gpu.json" \
    --devices all --per-gpu "${PER_GPU:-12,16,20,24}" --seconds "${SECONDS_EACH:-20}" \
    --gather-ms "${GATHER_MS:-20}" --models-dir /tmp/models >"${OUT:-/tmp}/multi_gpu.log" 2>&1
echo "multi_gpu rc=$?"
grep -E "^gpus=|^\{" "${OUT:-/tmp}/multi_gpu.log"
tail -3 "${OUT:-/tmp}/multi_gpu.log"
