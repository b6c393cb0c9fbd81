"""Fixtures shared by every test directory, and the `--run-slow` option.

Artifacts come from the training package (tests may import it; the service never does), exported
once per session and shared by tests/service and tests/reliability:
  tiny   MLP Bernoulli VAE on 8x8 digits (latent 4)
  tinyc  the same, conditional (labels "0".."9")
  lin    linear-Gaussian model (probabilistic PCA), whose exact log p(x) is known
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (long reliability variants)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long variants are deselected (not skipped) unless --run-slow: they are a separate, opt-in run."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@dataclass
class Artifacts:
    models_dir: Path
    vaes: dict[str, Any]  # name -> trained torch VAE (eval mode), for reference computations
    test_images: Any  # torch (N, 1, 8, 8) in [0, 1]
    test_labels: Any


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    import torch

    import training.export as export
    from training.data import load_dataset
    from training.models import ModelConfig
    from training.train import TrainConfig, model_from_checkpoint, train

    torch.set_num_threads(1)  # the machine is shared; these models are tiny
    tmp = tmp_path_factory.mktemp("artifacts")
    splits = load_dataset("digits8")
    mlp = ModelConfig(architecture="mlp", latent_dim=4, hidden_dim=64)
    linear = ModelConfig(architecture="linear", likelihood="gaussian", latent_dim=4)
    specs = {  # 10 epochs make the linear model's posterior good enough for k=2000 to be tight
        "tiny": dict(conditional=False, epochs=2, model=mlp),
        "tinyc": dict(conditional=True, epochs=2, model=mlp),
        "lin": dict(conditional=False, epochs=10, model=linear),
    }
    vaes = {}
    for name, spec in specs.items():
        cfg = TrainConfig(data="digits8", out_dir=str(tmp / f"run-{name}"), progress=False, **spec)
        vae, _ = model_from_checkpoint(train(cfg, splits=splits))
        # nll by default: the service tests pin behaviour to it (the auto choice is tested in tests/training)
        export.export_model(vae, splits, tmp / "models", name, "1", calibration_k=16, anomaly_method="nll")
        vaes[name] = vae.eval()
    return Artifacts(tmp / "models", vaes, splits.test_images, splits.test_labels)


@pytest.fixture(scope="session")
def models_dir(artifacts: Artifacts) -> Path:
    return artifacts.models_dir


@dataclass
class VQArtifact:
    models_dir: Path  # holds tinyvq/1 alone
    model: Any  # the trained torch VQVAE (eval mode), for reference computations
    test_images: Any


@pytest.fixture(scope="session")
def vq_artifact(tmp_path_factory: pytest.TempPathFactory) -> VQArtifact:
    """tinyvq: a VQ-VAE on 8x8 digits, a 2x2 grid of 8 codes, exported like the default model."""
    import torch

    from training.data import load_dataset
    from training.export_vq import export_vq_model
    from training.train_vq import VQTrainConfig, model_from_checkpoint, train_vq
    from training.vqvae import VQConfig

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("vq-artifact")
    splits = load_dataset("digits8")
    config = VQTrainConfig(data="digits8", out_dir=str(tmp / "run"), epochs=3, prior_epochs=3, progress=False,
                           model=VQConfig(codebook_size=8, code_dim=4, channels=8, prior_channels=8,
                                          prior_layers=2))
    model, _ = model_from_checkpoint(train_vq(config, splits=splits))
    export_vq_model(model, splits, tmp / "models", "tinyvq", "1", calibration_k=16, anomaly_method="nll")
    return VQArtifact(tmp / "models", model.eval(), splits.test_images)
