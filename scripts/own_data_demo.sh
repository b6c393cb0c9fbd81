#!/usr/bin/env bash
# The README's "Training and serving your own model" section, verbatim, in a scratch folder: a folder of coloured shapes ->
# trained conv VAE with a Gaussian decoder -> export (calibration split, method chosen on validation) ->
# ood-eval on the test split. The figures in docs/own-data.md come from this run.
#   scripts/own_data_demo.sh [WORK_DIR]     (default runs/own-data; about 25 min on 2 CPU cores)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$ROOT/runs/own-data}"
PY="$ROOT/.venv/bin/python"
mkdir -p "$WORK" && cd "$WORK"
"$PY" -m training make-shapes data/shapes
"$PY" -m training train --data folder:data/shapes --color-mode RGB --image-height 32 --image-width 32 \
    --architecture conv --likelihood gaussian --epochs 150 --out-dir runs/shapes
"$PY" -m training evaluate runs/shapes/best.pt --k 1000
"$PY" -m training export runs/shapes/best.pt --name shapes --models-dir models
"$PY" -m training ood-eval models/shapes/1 --out runs/shapes/ood
echo "results: $WORK/runs/shapes/ood/ood.md"
