#!/usr/bin/env bash
# Server CPU per 2xx answer of two checkouts of this repository, in alternating (ABBA) rounds: what a
# set of commits changed, measured the way benchmarks/cpu_ab.py measures settings.
#
#   git worktree add /tmp/before <commit>
#   benchmarks/ab_trees.sh /tmp/before . encode 64 8 4     # OLD NEW ROUTE CONNECTIONS SECONDS ROUNDS
#
# Each run starts `python -m service` (this venv, VAE_THREADS=1, mnist-vae:1) from one tree on port
# 8130, warms it for 2 s, runs `hey -z <s>s -c <c>` with the 1-image JSON body of the serving benchmark
# (written to a temporary folder) and reads the tree's CPU ticks from /proc around it. Prints one line per run.
set -euo pipefail
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); ROUTE=$3; C=$4; S=$5; R=$6
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
BODY_DIR=$(mktemp -d)
trap 'pkill -f "python -m service --port 8130" || true; rm -rf "$BODY_DIR"' EXIT
(cd "$ROOT/benchmarks" && "$PY" -c "
import sys; from pathlib import Path
from payloads import real_digits; from serving_benchmark import write_bodies
print(write_bodies(real_digits(28, 28, 'L'), Path(sys.argv[1]))[(1, 'json-base64')][0])" "$BODY_DIR" > "$BODY_DIR/path")
BODY=$(cat "$BODY_DIR/path")
ticks() {
  local t=0
  for p in $(pgrep -f "python -m service --port 8130"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done
  echo "$t"
}
run() {  # TREE LABEL
  (cd "$1" && VAE_THREADS=1 VAE_MODELS=mnist-vae:1 setsid "$PY" -m service --port 8130 > "$BODY_DIR/server.log" 2>&1 &)
  for _ in $(seq 600); do curl -sf localhost:8130/readyz > /dev/null && break; sleep 0.2; done
  local url="http://127.0.0.1:8130/v1/models/mnist-vae/$ROUTE"
  hey -z 2s -c "$C" -m POST -T application/json -D "$BODY" "$url" > /dev/null
  local c0 n c1
  c0=$(ticks)
  n=$(hey -z "${S}s" -c "$C" -m POST -T application/json -D "$BODY" "$url" | awk '/\[200\]/ {print $2}')
  c1=$(ticks)
  echo "$2 $(( (c1 - c0) * 1000000 / $(getconf CLK_TCK) / n )) us CPU per 2xx, $(( n / S )) req/s"
  pkill -f "python -m service --port 8130"; sleep 1.5
}
for r in $(seq "$R"); do
  if [ $((r % 2)) -eq 1 ]; then run "$OLD" old; run "$NEW" new; else run "$NEW" new; run "$OLD" old; fi
done
