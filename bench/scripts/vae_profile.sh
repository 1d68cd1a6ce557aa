# Issue 4: how close the VAE decoder runs to the GPU's limit (engines/gpu/vae_profile.py), on
# the GPU machine (repo root): conv FLOPs per frame, kernel time by kind, eager and compiled.
# Output: $OUT/vae_profile.json (+ the log). About 2-4 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -3
export PYTHONPATH=/tmp/site:$PWD
timeout "${LIMIT:-240}" python3 -m engines.gpu.vae_profile "${OUT:-/tmp}/vae_profile.json" \
    --budget-s "${BUDGET_S:-120}" >"${OUT:-/tmp}/vae_profile.log" 2>&1
echo "profile rc=$?"
grep "^\[vae_profile\]" "${OUT:-/tmp}/vae_profile.log" | cut -c1-1500
tail -3 "${OUT:-/tmp}/vae_profile.log"
