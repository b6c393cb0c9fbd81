"""Data-parallel training: two CPU processes under torchrun (gloo), as `torchrun ... -m training train`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from training.data import DataSplits
from training.train import TrainConfig, model_from_checkpoint, prepare_eval_images, train, validation_scores

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "digits8", "--architecture", "mlp", "--latent-dim", "4", "--hidden-dim", "32",
        "--batch-size", "32", "--val-iw-samples", "8", "--device", "cpu", "--threads", "1", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "training", "train", *TINY, "--out-dir", str(out), *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    # A timeout instead of a hung CI job if the ranks ever disagree about the number of all-reduces.
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_cpu_run_matches_single_process(tmp_path: Path, digits8: DataSplits) -> None:
    result = _torchrun(tmp_path / "ddp", "--epochs", "4", "--lr", "0.01")
    assert result.stdout.count("best.pt") == 1  # only rank 0 reports (and writes)
    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "finished.json", "last.pt",
                                                    "metrics.jsonl"]
    assert _epochs(run) == [0, 1, 2, 3]  # one line per epoch, not one per rank
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["world_size"] == 2 for r in records)  # really data-parallel, not two solo runs
    ddp_vae, ckpt = model_from_checkpoint(run / "best.pt")
    assert ckpt["train_config"]["data"] == "digits8" and ckpt["model_config"]["latent_dim"] == 4

    single = TrainConfig.from_dict({
        "data": "digits8", "out_dir": str(tmp_path / "single"), "epochs": 4, "batch_size": 32, "lr": 0.01,
        "val_iw_samples": 8, "device": "cpu", "threads": 1, "progress": False,
        "model": {"architecture": "mlp", "latent_dim": 4, "hidden_dim": 32},
    })
    single_vae, _ = model_from_checkpoint(train(single, splits=digits8))
    val_x = prepare_eval_images(digits8.val_images, "bernoulli", seed=7)
    ddp_elbo = validation_scores(ddp_vae, val_x, None, 8)["val_elbo"]
    single_elbo = validation_scores(single_vae, val_x, None, 8)["val_elbo"]
    first_epoch = records[0]["val_elbo"]
    print(f"validation ELBO: ddp {ddp_elbo:.2f} (epoch 0: {first_epoch:.2f}), single {single_elbo:.2f}")
    assert torch.isfinite(torch.tensor(ddp_elbo)) and ddp_elbo > first_epoch + 0.2  # it learned
    # Same config, half the optimizer steps per epoch (each rank sees half of every epoch and the
    # gradients are averaged): close to the single-process run, not identical.
    assert abs(ddp_elbo - single_elbo) < 1.5, (ddp_elbo, single_elbo)


def test_uneven_shards_and_early_stopping_do_not_hang(tmp_path: Path) -> None:
    """129 training images: shards of 65 and 64 would be 2 and 1 batches of 64. And lr 0 with patience 1
    stops at epoch 1, a decision only rank 0 can make. Both used to leave one rank waiting forever."""
    _torchrun(tmp_path, "--subset", "129", "--batch-size", "64", "--lr", "0", "--patience", "1",
              "--epochs", "50", timeout=120)
    assert _epochs(tmp_path) == [0, 1]
