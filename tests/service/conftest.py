"""Fixtures for the service tests: small real artifacts exported once per session, and app factories.

Artifacts come from the training package (tests may import it; the service never does):
  tiny   MLP Bernoulli VAE on 8x8 digits (latent 4)
  tinyc  the same, conditional (labels "0".."9")
  lin    linear-Gaussian model (probabilistic PCA), whose exact log p(x) is known
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Starlette's TestClient warns that it wants httpx2; httpx is what the project pins.
warnings.filterwarnings("ignore", message=".*httpx.*starlette.testclient.*")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402


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
        export.export_model(vae, splits, tmp / "models", name, "1", calibration_k=16)
        vaes[name] = vae.eval()
    return Artifacts(tmp / "models", vaes, splits.test_images, splits.test_labels)


@pytest.fixture(scope="session")
def models_dir(artifacts: Artifacts) -> Path:
    return artifacts.models_dir


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(models_dir: Path) -> SettingsFactory:
    """Settings for tests: the session's artifacts, one thread, small batches; overrides as kwargs."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(models_dir=models_dir, threads=1, max_batch_size=16,
                                      max_batch_samples=2048, max_queue_delay_ms=2.0)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_app(make_settings: SettingsFactory) -> Callable[..., FastAPI]:
    def make(**overrides: Any) -> FastAPI:
        return create_app(make_settings(**overrides))

    return make


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    """One running app (lifespan done) shared by a module's read-only tests."""
    settings = Settings(models_dir=models_dir, threads=1, max_batch_size=16, max_batch_samples=2048)
    with TestClient(create_app(settings)) as c:
        yield c
