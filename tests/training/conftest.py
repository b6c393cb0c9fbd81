"""Shared fixtures for the training tests: tiny training configs and the digits8 splits.

Everything here is sized for a 2-core CI machine: digits8 (8x8 images), hidden layers of 32 units,
a few epochs, one torch thread (another job may be training on the other core).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.data import DataSplits, load_digits8
from training.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# One intra-op thread: faster than two here (the second core is busy) and bitwise reproducible.
torch.set_num_threads(1)

ConfigFactory = Callable[..., TrainConfig]


def tiny_config(out_dir: Path | str, model: dict | None = None, **overrides: object) -> TrainConfig:
    """A run that takes about a second: mlp, latent 4, hidden 32, 2 epochs on digits8."""
    raw: dict = {
        "data": "digits8", "out_dir": str(out_dir), "epochs": 2, "batch_size": 64, "val_iw_samples": 8,
        "progress": False, "threads": 1, "seed": 0, "patience": 100,
    }
    raw.update(overrides)
    raw["model"] = {"architecture": "mlp", "latent_dim": 4, "hidden_dim": 32, **(model or {})}
    return TrainConfig.from_dict(raw)


@pytest.fixture
def make_config() -> ConfigFactory:
    return tiny_config


@pytest.fixture(scope="session")
def digits8() -> DataSplits:
    return load_digits8()
