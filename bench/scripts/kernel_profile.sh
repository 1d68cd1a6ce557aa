# where a model's GPU time goes (bench/gpu/kernel_profile.py), on the GPU machine
# (repo root): conv FLOPs per frame, CUDA kernel time by kind, eager and compiled.
# MODEL=vae|unet, FLAGS="--nhwc-norm" etc. Output: $OUT/profile_$MODEL.json (+ the log).
# About 1-2 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -3
export PYTHONPATH=/tmp/site:$PWD
m="${MODEL:-vae}"
timeout "${LIMIT:-240}" python3 -m bench.gpu.kernel_profile "${OUT:-/tmp}/profile_$m.json" \
    --model "$m" --budget-s "${BUDGET_S:-120}" ${FLAGS:-} >"${OUT:-/tmp}/profile_$m.log" 2>&1
echo "profile rc=$?"
grep "^\[kernel_profile\]" "${OUT:-/tmp}/profile_$m.log" | cut -c1-1500
tail -3 "${OUT:-/tmp}/profile_$m.log"
