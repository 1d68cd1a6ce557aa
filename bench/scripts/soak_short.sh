# GPU soak in ONE device call (no gap between calls for the machine to go back in): a short
# soak (SOAK_MIN, default 3) with a CPU snapshot (top) two minutes in; JSON and logs to $OUT.
(sleep "${TOP_AT:-400}"; top -b -n 1 -w 200 | head -45 >/tmp/top.txt) &
SOAK_MIN=${SOAK_MIN:-3} bash bench/scripts/soak_run.sh
cp /tmp/soak.json /tmp/soak.log /tmp/top.txt "$OUT"/ 2>/dev/null
tail -c 300000 /tmp/serve.log >"$OUT"/serve.log
grep -c "clock fell behind" /tmp/serve.log
python3 -c "import json; d=json.load(open('/tmp/soak.json')); print(json.dumps({k: v for k, v in d.items() if k not in ('per_session', 'samples')}, indent=1)); [print(s['t'], {k: round(v, 2) for k, v in s.items() if k not in ('t', 'rss', 'gpu')}, s.get('gpu')) for s in d['samples']]; print([p.get('playout_at_end') for p in d['per_session']][:3])"
cat /tmp/top.txt | head -30
