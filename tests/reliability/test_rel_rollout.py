"""Model rollout without downtime, with a real `python -m service` process tree and real HTTP: new
versions (on SIGHUP) and new models (by polling) are verified, loaded and warmed up beside the running
ones, then served; a broken artifact is refused without touching what is served; a removed version is
retired. Encodes run throughout and every one must succeed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import httpx
import pytest

WAIT_S = 10.0  # the target: the new version answers within 10 s of SIGHUP


def add_version(models: Path, name: str, source: Path, version: str) -> Path:
    """Copy an artifact in as `name/version` (the manifest names its folder, nothing else changes)."""
    target = models / name / version
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(name=name, version=version)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> float:
    """Seconds until condition() is true (polled), or AssertionError."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def default_version(url: str, name: str) -> str | None:
    """The default version of `name` as 8 answers in a row give it (either HTTP worker may answer)."""
    seen = set()
    for _ in range(8):
        r = httpx.get(f"{url}/v1/models/{name}", timeout=5)
        seen.add(r.json()["version"] if r.status_code == 200 else None)
    return seen.pop() if len(seen) == 1 else None


class Load:
    """Encodes at 8 connections in a background thread until stopped."""

    def __init__(self, server: harness.Server, seconds: float) -> None:
        self.result: harness.RunResult | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", asyncio.run(harness.closed_loop(
            server.url, harness.ENCODE, harness.tiny_image_body(1), concurrency=8, duration_s=seconds))))
        self.thread.start()

    def statuses(self) -> dict[str, int]:
        self.thread.join()
        assert self.result is not None
        return self.result.statuses()


def everywhere(url: str, name: str, version: str) -> bool:
    """Eight answers in a row (new connections, so both workers are asked) name `version` the default:
    with engines per worker each worker rescans on its own signal."""
    return all(default_version(url, name) == version for _ in range(8))


# Shared: the inference process rescans; per worker (the default without a GPU): every worker does.
@pytest.mark.parametrize("placement", ["per-worker", "shared"])
def test_new_broken_and_removed_versions_switch_without_errors(models_dir: Path, tmp_path: Path,
                                                               placement: str) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny", models / "tiny")
    env = {"VAE_HTTP_WORKERS": "2", "VAE_LOG_LEVEL": "INFO", "VAE_ENGINE_PLACEMENT": placement}
    with harness.start_server(models, tmp_path / "server.log", env=env) as server:
        url = server.url
        load = Load(server, seconds=12.0)
        time.sleep(0.5)
        # 1. A new version: served beside version 1, and the default once loaded and warmed up.
        add_version(models, "tiny", models / "tiny" / "1", "2")
        os.kill(server.pid, signal.SIGHUP)
        switched = wait_for(lambda: everywhere(url, "tiny", "2"), "version 2 the default")
        versions = httpx.get(f"{url}/v1/models/tiny").json()["versions"]
        v2_meta = httpx.get(f"{url}/v2/models/tiny.encode/versions/2")
        # 2. A broken version: refused, named in the log and the metric; version 2 goes on answering.
        broken = add_version(models, "tiny", models / "tiny" / "1", "3")
        graph = broken / "encoder.onnx"
        graph.write_bytes(graph.read_bytes()[:-64] + b"\0" * 64)
        os.kill(server.pid, signal.SIGHUP)
        refusals = 2 if placement == "per-worker" else 1  # each engine refuses it
        wait_for(lambda: server.log().count("refusing model tiny/3") >= refusals, "tiny/3 refused")
        refused_metric = harness.scrape(url).get('vae_model_refused{model="tiny",version="3"}')
        default_after_broken = default_version(url, "tiny")
        # 3. A removed version: retired; the highest left becomes the default again.
        shutil.rmtree(models / "tiny" / "2")
        os.kill(server.pid, signal.SIGHUP)
        retired = wait_for(lambda: everywhere(url, "tiny", "1"), "version 1 the default again")
        gone = httpx.post(f"{url}/v1/models/tiny/versions/2/encode", json=harness.tiny_image_body(1))
        statuses = load.statuses()
        log = server.log()
    print(f"version 2 default {switched:.2f}s after SIGHUP; versions {versions}; after removal "
          f"{retired:.2f}s; encodes during it all: {statuses}")
    assert versions == ["1", "2"] and v2_meta.status_code == 200
    assert refused_metric == 1.0 and default_after_broken == "2"
    assert gone.status_code == 404, gone.text
    assert set(statuses) == {"200"}, statuses  # no error while versions came and went
    assert "Traceback" not in log and "died" not in log, log[-3000:]


def test_a_new_model_is_found_by_polling_and_served_on_every_protocol(models_dir: Path,
                                                                      tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny", models / "tiny")
    env = {"VAE_HTTP_WORKERS": "2", "VAE_LOG_LEVEL": "INFO", "VAE_MODEL_POLL_S": "0.5"}
    with harness.start_server(models, tmp_path / "server.log", env=env) as server:
        url = server.url
        add_version(models, "tinyb", models_dir / "tiny" / "1", "1")

        def listed() -> bool:  # by both HTTP workers: 8 answers in a row
            return all("tinyb" in [m["name"] for m in httpx.get(f"{url}/v1/models").json()["models"]]
                       for _ in range(8))

        found = wait_for(listed, "tinyb listed by both workers")
        encode = httpx.post(f"{url}/v1/models/tinyb/encode", json=harness.tiny_image_body(1))
        v2 = httpx.get(f"{url}/v2/models/tinyb.encode")
        log = server.log()
    print(f"tinyb served {found:.2f}s after it appeared")
    assert encode.status_code == 200 and v2.status_code == 200, (encode.text, v2.text)
    assert re.search(r"now serving tinyb version 1", log), log[-2000:]
