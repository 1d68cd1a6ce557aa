# GPU soak, part 2: wait (at most $WAIT s) for /tmp/soak.json, copy it and the logs to $OUT.
# A machine that is not the one part 1 ran on (it went back between the calls) has no
# /tmp/soak_run.log: say so and stop at once rather than wait for nothing.
if [ ! -f /tmp/soak_run.log ]; then echo "no soak here: the machine was replaced between the calls"; exit 3; fi
for _ in $(seq 1 "${WAIT:-540}"); do [ -f /tmp/soak.json ] && break; sleep 1; done
cat /tmp/soak_run.log
cp /tmp/soak.json /tmp/soak.log "$OUT"/ 2>/dev/null
tail -c 200000 /tmp/serve.log >"$OUT"/serve.log
python3 -c "import json; d=json.load(open('/tmp/soak.json')); print(json.dumps({k: v for k, v in d.items() if k not in ('per_session', 'samples')}, indent=1))"
nvidia-smi --query-gpu=name,memory.used --format=csv
echo "loop stalls logged: $(grep -c 'event loop stalled' /tmp/serve.log) (media: $(grep 'event loop stalled' /tmp/serve.log | grep -c 'media\['))"
echo "slow trims logged: $(grep -c 'trim was slow' /tmp/serve.log)"
grep -E "event loop stalled|trim was slow|heap frozen" /tmp/serve.log | tail -25 | cut -c1-200
echo "media stats lines: $(grep -c 'media stats' /tmp/serve.log), warnings: $(grep 'media stats' /tmp/serve.log | grep -c WARNING)"
grep 'media stats' /tmp/serve.log | grep WARNING | tail -15 | cut -c1-260
