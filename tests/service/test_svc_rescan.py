"""The rescan of the models directory (engine/registry.py), in process on the session's tiny model:
what it loads, refuses, retries and retires, and that requests addressed to a retired version are still
answered until its grace period ends. The real-process forms (SIGHUP, polling, load during the switch)
are in tests/reliability/test_rel_rollout.py."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.engine.local import LocalEngine
from service.metrics import Metrics


def add_version(models: Path, version: str, source: Path) -> Path:
    target = models / "tiny" / version
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_rescan_loads_refuses_retries_and_retires(models_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny" / "1", models / "tiny" / "1")
    settings = Settings(models_dir=models, threads=1, device_instances=1, request_timeout_s=0.5)
    x = np.full((1, 1, 8, 8), 0.5, np.float32)

    async def scenario() -> None:
        engine = LocalEngine(settings, Metrics())
        await engine.start()
        changes: list[list[str]] = []
        engine.on_models_change = lambda: changes.append(sorted(engine.models["tiny"]))
        try:
            await engine.rescan()
            assert changes == []  # nothing new: no announcement
            add_version(models, "2", models / "tiny" / "1")
            await engine.rescan()
            assert changes[-1] == ["1", "2"]
            # A broken version is refused once, not again while its files stay the same, then loaded
            # once they are fixed.
            broken = add_version(models, "3", models / "tiny" / "1")
            (broken / "encoder.onnx").write_bytes(b"not a graph")
            with caplog.at_level(logging.ERROR, logger="service.engine.registry"):
                await engine.rescan()
                await engine.rescan()
            refusals = [r for r in caplog.records if "refusing model tiny/3" in r.getMessage()]
            assert len(refusals) == 1 and "still serving tiny:1, tiny:2" in refusals[0].getMessage()
            assert sorted(engine.models["tiny"]) == ["1", "2"]
            shutil.copy(models / "tiny" / "1" / "encoder.onnx", broken / "encoder.onnx")
            await engine.rescan()
            assert changes[-1] == ["1", "2", "3"]
            # A removed version: no longer listed, still answering until its grace period ends.
            shutil.rmtree(models / "tiny" / "2")
            await engine.rescan()
            assert changes[-1] == ["1", "3"]
            out = await engine.infer("tiny", "2", "encode", {"x": x}, deadline=time.monotonic() + 10)
            assert out["mean"].shape == (1, 4)
            # Back and gone again within the grace period: the older retirement leaves the newer alone.
            add_version(models, "2", models / "tiny" / "1")
            await engine.rescan()
            shutil.rmtree(models / "tiny" / "2")
            await engine.rescan()
            await asyncio.sleep(settings.request_timeout_s + 1.2)
            with pytest.raises(Exception, match="not served"):
                await engine.infer("tiny", "2", "encode", {"x": x}, deadline=time.monotonic() + 10)
        finally:
            await engine.close()

    asyncio.run(scenario())
