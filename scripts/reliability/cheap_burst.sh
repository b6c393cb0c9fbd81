#!/usr/bin/env bash
# The reliability issue's burst of cheap work: `hey -n 600 -c 600` 1-image encodes (600 simultaneous
# connections) against the service with default settings on the committed models, three rounds.
# Target: 600 x 200 each round, p99 under 1 s. Needs hey (benchmarks/setup.sh).
#   scripts/reliability/cheap_burst.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/../.."
port="${1:-8123}"
log="$(mktemp)"
.venv/bin/python -m service --port "$port" >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -f "$log" "$body"' EXIT
for _ in $(seq 1 240); do curl -sf "localhost:$port/readyz" >/dev/null && break; sleep 0.5; done
body="$(mktemp)"
echo "{\"images\": [\"$(base64 -w0 docs/examples/digit.png)\"]}" >"$body"
for round in 1 2 3; do
    out="$(hey -n 600 -c 600 -m POST -T application/json -D "$body" \
        "http://127.0.0.1:$port/v1/models/mnist-vae/encode")"
    echo "round $round: $(grep -E '^\s+\[[0-9]+\]' <<<"$out" | tr -s ' \t' ' ' | tr '\n' ';')" \
         "p99 $(grep '99% in' <<<"$out" | awk '{print $3}') s"
    sleep 2
done
