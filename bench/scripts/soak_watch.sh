# GPU soak, between soak_start.sh and soak_collect.sh: wait $WAIT s (keeps the machine held),
# then show how the soak stands: its log, the server's errors, GPU memory.
sleep "${WAIT:-290}"
grep -v recompiles /tmp/soak_run.log | tail -5
tail -c 1500 /tmp/soak.log
echo "clock fell behind: $(grep -c 'clock fell behind' /tmp/serve.log)"
grep -iE "error|critical" /tmp/serve.log | tail -3 | cut -c1-300
curl -s http://127.0.0.1:8000/metrics | grep -E "^lipstream_(frames_dropped|late_frames|worker_launch_phase)" | head
nvidia-smi --query-gpu=memory.used --format=csv
