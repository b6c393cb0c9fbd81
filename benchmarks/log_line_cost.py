"""CPU time of one access-log line through the service's logging set-up, with the logging HOWTO's
"Optimization" switches off (what service/logs.py does) and at logging's defaults, in alternating rounds.

    .venv/bin/python benchmarks/log_line_cost.py

Each round writes 20,000 copies of the access-log line (`log.info("%s %s %d %.1fms", ...)`) 30 frames
deep, as in the server, through the handler and formatter of service.logs.configure_logging, to
/dev/null. Prints the median of each setting; nothing is written to disk.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.logs import configure_logging

LINES = 20_000
ROUNDS = 8
DEPTH = 30


def per_line_us(log: logging.Logger, depth: int) -> float:
    if depth:
        return per_line_us(log, depth - 1)
    started = time.perf_counter()
    for _ in range(LINES):
        log.info("%s %s %d %.1fms", "POST", "/v1/models/mnist-vae/encode", 200, 1.234)
    return (time.perf_counter() - started) / LINES * 1e6


def main() -> None:
    defaults = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    configure_logging("INFO", False)
    switched = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open("/dev/null", "w"))  # noqa: SIM115 (open for the whole run)
    log = logging.getLogger("service.api.middleware")
    results: dict[str, list[float]] = {"switches off (service/logs.py)": [], "logging's defaults": []}
    for _ in range(ROUNDS):
        for name, state in zip(results, (switched, defaults), strict=True):
            (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing) = state
            results[name].append(per_line_us(log, DEPTH))
    for name, values in results.items():
        print(f"{name:32} median {statistics.median(values):6.2f} us per line "
              f"({min(values):.2f}-{max(values):.2f} over {ROUNDS} rounds)")


if __name__ == "__main__":
    main()
