# GPU soak, part 1: start soak_run.sh in its own session and watch it for $WAIT seconds (keep
# WAIT well under the device's per-command limit). Then soak_watch.sh, then soak_collect.sh, each
# called at once after the one before (the machine goes back 30 s after a call).
setsid nohup bash bench/scripts/soak_run.sh >/tmp/soak_run.log 2>&1 </dev/null &
sleep "${WAIT:-480}"
cat /tmp/soak_run.log
tail -3 /tmp/serve.log | cut -c1-300
curl -s http://127.0.0.1:8000/metrics | grep -E "^lipstream_(frames_dropped|frames_sent|sessions_active)" | head
