#!/usr/bin/env bash
# Train, evaluate and export models/mnist-vqvae/1 (the VQ-VAE issue), resumably:
#   train:    autoencoder with EMA codebook, then the gated PixelCNN prior on its codes, then the
#             posterior temperature on validation digits            (configs/mnist-vqvae.json)
#   evaluate: test-set bounds (k=1000), codebook usage, FID and class coverage of 1000 samples
#   export:   graphs, parity, conformal calibration at k = 64 (each importance sample costs a PixelCNN
#             pass); the default anomaly method is chosen by the OOD suite on the validation digits
#             (--anomaly-method auto, 50 images per shift)
#   ood:      the OOD table on the test digits (100 per shift), into the report
#   final:    attach the report, now with the OOD table, to the artifact (no re-export)
# The split is mnist-vae/2's (seed 0, validation 10 %, calibration 1/9 of the rest); the test digits
# are used only for the report. Checkpoints go to $RUNS (default /work/runs, outside the work tree);
# python PIDs are appended to $PIDS so benchmarks can pause training with SIGSTOP/SIGCONT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RUNS="${RUNS:-/work/runs}"
PIDS="${PIDS:-/tmp/vae-train.pids}"
RUN="$RUNS/mnist-vqvae"
STEPS="${STEPS:-train evaluate export ood final}"

run() {  # run a python step niced in the background, record its PID, wait for it
    nice -n 19 "$PY" "$@" &
    echo $! >> "$PIDS"
    wait $!
}

for step in $STEPS; do case $step in
train)
    [ -f "$RUN/finished.json" ] || run -m training train --config configs/mnist-vqvae.json --out-dir "$RUN" --resume ;;
evaluate)
    [ -f "$RUN/report/report.json" ] || \
        run -m training evaluate "$RUN/best.pt" --k 1000 --classifier-cache "$RUNS/classifier-mnist5k.pt" ;;
export)
    run -m training export "$RUN/best.pt" --name mnist-vqvae --version 1 --anomaly-method auto \
        --calibration-k 64 --selection-per-shift 50 --force ;;
ood)
    run -m training ood-eval models/mnist-vqvae/1 --split test --per-shift 100 --out "$RUN/report/ood" \
        --report-md "$RUN/report/report.md" ;;
final)
    run -m training attach-report models/mnist-vqvae/1 "$RUN/report" ;;
esac; done
