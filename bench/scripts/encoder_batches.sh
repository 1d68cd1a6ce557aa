# a whisper encoder call at fixed batches 1, 2, 4, 8 (compiled + CUDA graph), and the
# cheapest padding for a step that needs k windows (bench/gpu/encoder_batches.py), on the GPU
# machine (repo root). Output: $OUT/encoder_batches.json (+ the log). About 1-2 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -3
export PYTHONPATH=/tmp/site:$PWD
timeout "${LIMIT:-200}" python3 -m bench.gpu.encoder_batches "${OUT:-/tmp}/encoder_batches.json" \
    --batches "${BATCHES:-1,2,4,8}" >"${OUT:-/tmp}/encoder_batches.log" 2>&1
echo "encoder_batches rc=$?"
grep "^\[encoder_batches\]" "${OUT:-/tmp}/encoder_batches.log"
tail -3 "${OUT:-/tmp}/encoder_batches.log"
