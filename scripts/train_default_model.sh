#!/usr/bin/env bash
# Reproduce the committed default model models/mnist-vae/1 from scratch:
# train on mnist5k with configs/mnist-vae.json, evaluate on the 1000 test digits with k=5000,
# then export (TorchScript + ONNX + manifest.json, parity-checked) with the report and figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RUN="${RUN:-runs/mnist-vae}"

rm -rf "$RUN"
"$PY" -m training train --config configs/mnist-vae.json --out-dir "$RUN"
"$PY" -m training evaluate "$RUN/best.pt" --k 5000
"$PY" -m training export "$RUN/best.pt" --name mnist-vae --version 1 --force
