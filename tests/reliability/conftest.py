"""Fixtures of the reliability suite; the artifacts (`models_dir`) come from tests/conftest.py.

Real-process tests use scripts/reliability/harness.py (a subprocess `python -m service` on a free
127.0.0.1 port, raw HTTP clients, /proc RSS); the long variants are marked slow (--run-slow) or live
in scripts/reliability/.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "reliability"))
warnings.filterwarnings("ignore", message=".*httpx.*starlette.testclient.*")

from fastapi.testclient import TestClient  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402

# Small limits: every limit is reachable with small requests on a shared 2-core machine.
LIMITS = dict(threads=1, device_instances=1, max_batch_size=16, max_batch_samples=2048, max_k=300,
              default_k=64, max_n=16, max_images=4, max_queue_size=64, max_upload_bytes=256 * 1024,
              max_image_pixels=1_000_000, log_level="WARNING")


@pytest.fixture(scope="module")
def rel_client(models_dir: Path) -> Iterator[TestClient]:
    """One running app with the small limits, shared by a module's tests."""
    with TestClient(create_app(Settings(models_dir=models_dir, **LIMITS))) as client:
        yield client
