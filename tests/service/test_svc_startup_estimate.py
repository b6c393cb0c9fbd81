"""The start-up cost model and warning: built from the real ServedModel, Batcher and family classes.

The warm-up's timings go through a scripted clock, and the cost model is set by `calibrate`, so no
assertion here depends on how fast this machine is.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.artifacts import load_manifest
from service.config import Settings
from service.engine import registry
from service.engine.batching import DeviceExecutor
from service.engine.interface import TooExpensive
from service.engine.registry import WARMUP_REPEATS, ServedModel
from service.engine.runtime import load_runtime
from service.families import Options
from service.metrics import Metrics


def served(models_dir: Path, **overrides: Any) -> tuple[ServedModel, Settings]:
    """The tiny model with its real runtime and batchers (not warmed up, not started), and its settings."""
    settings = Settings(models_dir=models_dir, threads=1, device_instances=1, warmup=False, **overrides)
    manifest = load_manifest(models_dir / "tiny" / "1", "onnx")
    runtime = load_runtime(manifest, "onnx", "cpu", 1)
    return ServedModel(manifest, runtime, DeviceExecutor(runtime.device, 1), settings, Metrics()), settings


class ScriptedClock:
    """perf_counter for the warm-up: each graph run advances it by a scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class ScriptedRuntime:
    """The real runtime, with each run costing 10 ms + 2 ms per row on the scripted clock; the first run
    of each batch size costs 5 s more (one-off allocations), and one of the timed repeats 1 s more (another
    process on the cores)."""

    def __init__(self, runtime: Any, clock: ScriptedClock) -> None:
        self.runtime, self.clock = runtime, clock
        self.name, self.device, self.details = runtime.name, runtime.device, runtime.details
        self.runs: dict[tuple[str, int], int] = {}

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runtime.run(graph, inputs)
        rows = len(next(iter(inputs.values())))
        run = self.runs[(graph, rows)] = self.runs.get((graph, rows), 0) + 1
        self.clock.now += 0.010 + 0.002 * rows + (5.0 if run == 1 else 1.0 if run == 2 else 0.0)
        return out


def test_warm_up_cost_model_ignores_first_runs_and_one_slow_repeat(models_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = served(models_dir)
    clock = ScriptedClock()
    monkeypatch.setattr(registry, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    model.runtime = scripted = ScriptedRuntime(model.runtime, clock)
    model.warm_up_sync()
    for graph, batcher in model.batchers.items():
        runs = 1 + WARMUP_REPEATS  # one untimed, then the timed repeats
        largest = batcher.max_batch_rows
        if batcher.max_batch_seconds is not None:  # time-sliced: about two slices' worth of 12 ms rows
            largest = min(largest, math.ceil(2 * batcher.max_batch_seconds / 0.012))
            assert largest < batcher.max_batch_rows, graph  # never the whole row cap
        assert scripted.runs[(graph, 1)] == scripted.runs[(graph, largest)] == runs
        # The medians, 12 ms for 1 row and 10 ms + 2 ms per row for the largest batch: exactly the script.
        assert batcher.seconds_per_row == pytest.approx(0.002, rel=1e-9), graph
        assert batcher.batch_seconds(1) == pytest.approx(0.012, rel=1e-9), graph


# (fixed, per-row) seconds of a log_weights batch and the deadline: full batches of 16 rows, or batches
# cut to 5 rows by the 50 ms time slice (the last case).
@pytest.mark.parametrize("fixed_s, per_row_s, timeout_s", [(0.010, 0.002, 10.0), (0.001, 0.0004, 1.0),
                                                            (0.030, 0.004, 30.0)])
def test_the_warning_counts_exactly_the_largest_request_admission_accepts(
        models_dir: Path, caplog: pytest.LogCaptureFixture, fixed_s: float, per_row_s: float,
        timeout_s: float) -> None:
    model, settings = served(models_dir, request_timeout_s=timeout_s, admission_share=0.5,
                             max_batch_samples=2048)
    rows = model.batchers["log_weights"].max_batch_rows
    model.batchers["log_weights"].calibrate((1, fixed_s + per_row_s), (rows, fixed_s + rows * per_row_s))
    with caplog.at_level(logging.WARNING, logger="service.engine.registry"):
        model.warn_if_limits_exceed_deadline(settings)
    (message,) = [r.getMessage() for r in caplog.records if "largest log-likelihood" in r.getMessage()]
    found = re.search(r"up to (\d+) images fit", message)
    assert found is not None, message
    printed = int(found.group(1))

    def admitted(images: int) -> bool:
        try:
            model.check_admission("log_likelihood", images, Options(k=settings.max_k),
                                  time.monotonic() + settings.request_timeout_s)
        except TooExpensive:
            return False
        return True

    accepted = [n for n in range(1, settings.max_images + 1) if admitted(n)]
    assert accepted == list(range(1, printed + 1))  # every count up to the printed one, and no more
    assert 0 < printed < settings.max_images


def test_no_warning_when_the_largest_request_fits(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, settings = served(models_dir)
    rows = model.batchers["log_weights"].max_batch_rows
    model.batchers["log_weights"].calibrate((1, 1e-6), (rows, rows * 1e-6))
    with caplog.at_level(logging.WARNING, logger="service.engine.registry"):
        model.warn_if_limits_exceed_deadline(settings)
    assert not [r for r in caplog.records if "largest log-likelihood request" in r.getMessage()]
    model.check_admission("log_likelihood", settings.max_images, Options(k=settings.max_k),
                          time.monotonic() + settings.request_timeout_s)  # admitted: no TooExpensive
