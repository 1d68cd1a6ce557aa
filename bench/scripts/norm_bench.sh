# GroupNorm + SiLU alone at the VAE decoder's shapes (batch 16): eager, the compiled
# channels-last torch form and the Triton kernels over launch shapes, in GB/s against the
# bytes each call must move (bench/gpu/norm_bench.py), on the GPU machine (repo root).
# Output: $OUT/norm_bench.json (+ the log). About 1-2 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -3
export PYTHONPATH=/tmp/site:$PWD
timeout "${LIMIT:-240}" python3 -m bench.gpu.norm_bench "${OUT:-/tmp}/norm_bench.json" \
    --tiles "${TILES:-4096,8192,16384}" --warps "${WARPS:-4,8}" >"${OUT:-/tmp}/norm_bench.log" 2>&1
echo "norm_bench rc=$?"
grep "^\[norm_bench\]" "${OUT:-/tmp}/norm_bench.log"
tail -3 "${OUT:-/tmp}/norm_bench.log"
