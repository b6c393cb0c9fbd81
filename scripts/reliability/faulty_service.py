"""`python -m service`, with optional simulated device time: the real entry point in a real process.

RELIABILITY_BATCH_DELAY_S=<seconds> adds that much sleep to every batch on the device thread (a
stand-in for a GPU that is busy while the CPU is free), so overload and drain tests can make the
model the bottleneck on any machine. Without it, this is exactly `python -m service`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `service`

import service.engine.registry as registry
from service.__main__ import main


class DelayedRuntime:
    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.device, self.details = inner.name, inner.device, inner.details

    def run(self, graph: str, inputs: dict) -> dict:
        time.sleep(self.delay)
        return self.inner.run(graph, inputs)


def _install_delay() -> None:
    delay = float(os.environ.get("RELIABILITY_BATCH_DELAY_S", "0") or 0)
    if delay <= 0:
        return
    load = registry.load_runtime

    def delayed(*args: Any, **kwargs: Any) -> Any:
        return DelayedRuntime(load(*args, **kwargs), delay)

    registry.load_runtime = delayed  # type: ignore[assignment]


if __name__ == "__main__":
    _install_delay()
    sys.exit(main())
