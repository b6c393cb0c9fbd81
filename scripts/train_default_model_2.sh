#!/usr/bin/env bash
# Train, evaluate and export the default model models/mnist-vae/2 (issue 9), resumably:
#   phase 1: conv VAE, ELBO with KL warm-up and small affine augmentation, early stopping on the
#            validation IWAE(k=8) bound            (configs/mnist-vae-2.json)
#   phase 2: IWAE (k=5) fine-tuning of phase 1's best (EMA) weights, lower lr (configs/mnist-vae-2-iwae.json)
#   background: the likelihood-ratio background model on perturbed inputs (configs/mnist-vae-2-background.json)
#   then: k=5000 test evaluation, export with the background graph and per-method calibration, ood-eval.
# Every step resumes or is skipped when its output exists, so re-running the script finishes a run.
# Checkpoints go to $RUNS (default /work/runs, outside the work tree). Every python PID is appended
# to $PIDS so benchmarks can pause training with SIGSTOP/SIGCONT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RUNS="${RUNS:-/work/runs}"
PIDS="${PIDS:-/tmp/vae-train.pids}"
NICE="nice -n 19"
STEPS="${STEPS:-train background evaluate export ood}"

run() {  # run a python step in the background, record its PID, wait for it
    $NICE "$PY" "$@" &
    echo $! >> "$PIDS"
    wait $!
}
finished() { [ -f "$1/finished.json" ]; }  # train writes it when early stopping or the epoch cap ends a run

for step in $STEPS; do case $step in
train)
    finished "$RUNS/mnist-vae-2" || \
        run -m training train --config configs/mnist-vae-2.json --out-dir "$RUNS/mnist-vae-2" --resume
    finished "$RUNS/mnist-vae-2-iwae" || \
        run -m training train --config configs/mnist-vae-2-iwae.json --out-dir "$RUNS/mnist-vae-2-iwae" \
            --init-from "$RUNS/mnist-vae-2/best.pt" --resume ;;
background)
    finished "$RUNS/mnist-vae-2-background" || \
        run -m training train --config configs/mnist-vae-2-background.json \
            --out-dir "$RUNS/mnist-vae-2-background" --resume ;;
evaluate)
    [ -f "$RUNS/mnist-vae-2-iwae/report/report.json" ] || \
        run -m training evaluate "$RUNS/mnist-vae-2-iwae/best.pt" --k 5000 ;;
export)
    run -m training export "$RUNS/mnist-vae-2-iwae/best.pt" --name mnist-vae --version 2 \
        --background "$RUNS/mnist-vae-2-background/best.pt" --force ;;
ood)
    run -m training ood-eval models/mnist-vae/2 --out models/mnist-vae/2/report/ood --threads 1 ;;
esac; done
