# Avatar registration on the GPU: MuseTalk v1.5's face preparation (S3FD -> DWPose -> box ->
# BiSeNet jaw mask) and the VAE latents for a 250-frame 720p clip, batched as lipstream registers
# against frame by frame as MuseTalk's own preprocessing runs, in one run (bench/gpu/face_prep.py),
# on the GPU machine (repo root). FRAMES (default 250), BATCH (default 16). MODELS (default
# /tmp/face-models, made here: random full-size weights of every model, which face_prep then
# knows are random and caps S3FD's NMS for; no weights can be downloaded there). Output:
# $OUT/face_prep.json (+ the log). A few minutes.
. bench/scripts/device_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout "${LIMIT:-540}" python3 -m bench.gpu.face_prep "${OUT:-/tmp}/face_prep.json" \
    --models-dir "${MODELS:-/tmp/face-models}" --frames "${FRAMES:-250}" --batch "${BATCH:-16}" \
    >"${OUT:-/tmp}/face_prep.log" 2>&1
echo "face_prep rc=$?"
tail -5 "${OUT:-/tmp}/face_prep.log"
