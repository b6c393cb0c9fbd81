"""Fixtures for the service tests: app factories over the session's artifacts.

The artifacts themselves (`artifacts`, `models_dir`: tiny, tinyc, lin) are built once per session in
tests/conftest.py, shared with tests/reliability.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Starlette's TestClient warns that it wants httpx2; httpx is what the project pins.
warnings.filterwarnings("ignore", message=".*httpx.*starlette.testclient.*")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(models_dir: Path) -> SettingsFactory:
    """Settings for tests: the session's artifacts, one thread, small batches; overrides as kwargs."""

    def make(**overrides: Any) -> Settings:
        # One execution thread per device, so tests that hold the device know where every row is.
        values: dict[str, Any] = dict(models_dir=models_dir, threads=1, device_instances=1, max_batch_size=16,
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
    settings = Settings(models_dir=models_dir, threads=1, device_instances=1, max_batch_size=16,
                        max_batch_samples=2048)
    with TestClient(create_app(settings)) as c:
        yield c
