# GroupNorms (39 % of the compiled VAE decoder's GPU time on the H200 when stock):
# stock, channels-last (engines/pipeline/nhwc_norm.py, the default) and the Triton
# kernels (engines/pipeline/triton_norm.py), on the GPU machine (repo root).
#   PART=profile  (~3 min for two runs): kernel_profile.py for RUNS (default "vae:channel
#                           vae:triton"; also vae:stock, vae:group; the UNet's compile is
#                           longer: RUNS="unet:stock unet:channel" as a call of its own)
#                           -> $OUT/kp_<model>_<stats>.json
#   PART=pipeline (~7 min): the bench's MuseTalk reference, full pipeline and accuracy for
#                           VARIANTS (default compiled,compiled-tritonnorm; compiled is now
#                           the channels-last form; -stocknorm, -nhwcgnorm for the others)
#                           -> $OUT/bench_nhwcnorm.json
OUT="${OUT:-/tmp}"
if [ "${PART:-profile}" = profile ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -3
    export PYTHONPATH=/tmp/site:$PWD
    for mv in ${RUNS:-vae:channel vae:triton}; do
        m=${mv%%:*}; v=${mv##*:}
        flag=""; [ $v != stock ] && flag="--nhwc-norm $v"
        {
            timeout "${LIMIT:-170}" python3 -m bench.gpu.kernel_profile "$OUT/kp_${m}_$v.json" \
                --model $m $flag --budget-s 60 >"$OUT/kp_${m}_$v.log" 2>&1
            echo "$m $v rc=$?"
            python3 - "$OUT/kp_${m}_$v.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for s in ("eager", "compiled"):
    x = d.get(s) or {}
    print(" ", s, x.get("event_ms_per_frame"), x.get("ms_per_frame"), x.get("max_diff_vs_stock"))
PY
        }
    done
else
    . bench/scripts/device_env.sh
    timeout "${LIMIT:-560}" python3 -m bench.runner --sections reference,pipeline,accuracy \
        --backends "torch,${VARIANTS:-compiled,compiled-tritonnorm}" --out "$OUT/bench_nhwcnorm.json" \
        >"$OUT/bench_nhwcnorm.log" 2>&1
    echo "bench rc=$?"
    python3 - "$OUT/bench_nhwcnorm.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("reference", (d.get("reference") or {}).get("fps"))
for k, v in (d.get("pipeline") or {}).items():
    print("pipeline", k, v)
for k, v in (d.get("accuracy") or {}).items():
    print("accuracy", k, v)
PY
    tail -3 "$OUT/bench_nhwcnorm.log"
fi
