# The offline full pipeline (encoder + UNet + VAE + GPU paste-back into 720p + I420)
# for pipeline variants side by side, MuseTalk's way measured in the same run, on the GPU
# machine (repo root). VARIANTS (default compiled,compiled-split,compiled-tuned; the eager
# `torch` pipeline always runs first), BUCKETS (default 48: offline batches are full, so one
# bucket saves each compiled variant ~35 s of captures), CLIP_S (default 19.2: 480 frames, ten
# full batches of 48), ROUNDS (timed rounds per variant, interleaved, default 5). Each variant's fps lands in the
# JSON as soon as it is measured, so a run cut short keeps the ones before.
# Output: $OUT/bench_offline.json (+ the log), $OUT/paste_bench.json (bench.gpu.paste_bench).
. bench/scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# the paste stage alone first (~20 s): whole-frame I420 against region-only
timeout 120 python3 -m bench.gpu.paste_bench "${OUT:-/tmp}/paste_bench.json" 2>&1 | tail -4
timeout "${LIMIT:-520}" python3 -m bench.runner --sections reference,pipeline \
    --backends "torch,${VARIANTS:-compiled,compiled-split,compiled-tuned}" --buckets "${BUCKETS:-48}" \
    --clip-s "${CLIP_S:-19.2}" --rounds "${ROUNDS:-5}" \
    --out "${OUT:-/tmp}/bench_offline.json" >"${OUT:-/tmp}/bench_offline.log" 2>&1
echo "bench rc=$?"
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_offline.json")))
ref = (d.get("reference") or {}).get("fps")
print("gpu", (d.get("setup") or {}).get("gpu"), "reference fps", ref)
for k, v in (d.get("pipeline") or {}).items():
    if isinstance(v, dict):
        print("pipeline", k, round(v["fps"], 1), f"{v['fps'] / ref:.2f}x" if ref else "", [round(x) for x in v.get("fps_rounds", [])])
for k, v in (d.get("warmup") or {}).items():
    print("warmup", k, round(v["total_s"], 1))
PY
grep -E "Error|error|Traceback" "${OUT:-/tmp}/bench_offline.log" | head -5
tail -2 "${OUT:-/tmp}/bench_offline.log"
