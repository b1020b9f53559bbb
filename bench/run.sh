#!/bin/sh
# Runs bench/bench_mail.py in both modes (relay to a loopback sink, Maildir delivery)
# and prints a markdown table.  N, S, SIZE and PYTHON may be overridden from the
# environment; extra arguments go to every bench_mail.py run (e.g. --client smtp-source).
#
#   bench/run.sh                      # N=2000 S=10 SIZE=5120
#   N=500 bench/run.sh --per-session 10
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
N=${N:-2000}
S=${S:-10}
SIZE=${SIZE:-5120}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python
    elif [ -x /work/venv/bin/python ]; then PYTHON=/work/venv/bin/python
    else PYTHON=python3; fi
fi
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT INT TERM
status=0
cd "$REPO" || exit 1
# Each mode twice: delivery running while mail comes in (end to end), then
# delivery held during the load and resumed after it (each side alone).
for run in "relay" "maildir" "relay --hold" "maildir --hold"; do
    mode=${run%% *}
    hold=""
    [ "$run" != "$mode" ] && hold="--hold"
    "$PYTHON" bench/bench_mail.py --mode "$mode" $hold -n "$N" -s "$S" --size "$SIZE" "$@" >"$OUT.one" || status=1
    sed -n 1p "$OUT.one" >&2
    sed -n '2,$p' "$OUT.one" >>"$OUT"
    rm -f "$OUT.one"
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
if not rows:
    sys.exit("bench/run.sh: no result")
r0 = rows[0]
print(f"{r0['date'][:10]}, {r0['nproc']} cores (`nproc`), Python {r0['python']}, "
      f"{'root' if r0['uid'] == 0 else 'unprivileged'}; N={r0['n']} messages of {r0['size']} bytes, "
      f"S={r0['sessions']} concurrent sessions, {r0['per_session']} message(s) per connection, "
      f"client {r0['client']}.")
print()
print("| mode | delivery | accepted msg/s | delivered msg/s | accepted / delivered | peak RSS MiB (all processes) | idle RSS MiB | peak PSS MiB | idle PSS MiB | commit latency p99 ms |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
def f(x):
    return "n/a" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)
for r in rows:
    note = " (timed out)" if r.get("timed_out") else ""
    note += f" (error: {r['error'].splitlines()[0]})" if r.get("error") else ""
    how = "held during the load, then resumed (drain rate)" if r.get("hold") else "concurrent (end to end)"
    print(f"| {r['mode']} ({r.get('sink', '?')}) | {how} | {f(r.get('accepted_per_s'))} | "
          f"{f(r.get('delivered_per_s'))} | {r.get('accepted')} / {r.get('delivered')}{note} | "
          f"{f(r.get('peak_rss_mib'))} | {f(r.get('idle_rss_mib'))} | {f(r.get('peak_pss_mib'))} | "
          f"{f(r.get('idle_pss_mib'))} | {f((r.get('commit_latency_ms') or {}).get('p99'))} |")
PY
exit $status
