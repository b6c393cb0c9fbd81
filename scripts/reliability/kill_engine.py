"""Long variant of the crash target: SIGKILL the inference process of the service (committed default
model, default settings but VAE_ENGINE_PLACEMENT=shared: engines per worker, the default without a GPU,
have no inference process) while 16 connections send 1-image encodes; how long until callers get 503, how
long until /readyz answers 200 again, and what every request got. tests/reliability/test_rel_processes.py
(test_killed_inference_process_fails_in_flight_503_and_recovers) is the CI form.

    python scripts/reliability/kill_engine.py [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

RESULTS = Path(__file__).resolve().parent / "results"
CONNECTIONS = 16


async def scenario(server: harness.Server) -> dict[str, Any]:
    digit = (harness.ROOT / "docs" / "examples" / "digit.png").read_bytes()
    request = harness.encode_request("POST", "/v1/models/mnist-vae/encode", server.port,
                                     {"images": [base64.b64encode(digit).decode()]})
    readyz = harness.encode_request("GET", "/readyz", server.port)
    answers: list[tuple[float, int | None]] = []  # (time answered, status)
    stop = time.monotonic() + 12.0

    async def caller() -> None:
        while time.monotonic() < stop:
            status, *_ = await harness.timed_request(server.port, request, 30)
            answers.append((time.monotonic(), status))

    callers = [asyncio.create_task(caller()) for _ in range(CONNECTIONS)]
    await asyncio.sleep(3.0)
    victim = harness.engine_pids(server.log())[-1]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    ready_again, seen_unready = None, False
    while time.monotonic() - killed < 60:  # /readyz: 503 once the workers notice, then 200 again
        status, *_ = await harness.timed_request(server.port, readyz, 5)
        if status != 200:
            seen_unready = True
        elif seen_unready:
            ready_again = time.monotonic() - killed
            break
        await asyncio.sleep(0.02)
    await asyncio.gather(*callers)
    after = [(t - killed, s) for t, s in answers if t > killed]
    first_503 = min((t for t, s in after if s == 503), default=None)
    counts: dict[str, int] = {}
    for _, s in answers:
        counts[str(s)] = counts.get(str(s), 0) + 1
    ok_after = [t for t, s in after if s == 200 and ready_again is not None and t > ready_again]
    return {"victim_pid": victim, "first_503_after_s": None if first_503 is None else round(first_503, 3),
            "ready_again_after_s": None if ready_again is None else round(ready_again, 2),
            "statuses": counts, "answered_200_after_recovery": len(ok_after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "kill_engine.json")
    args = parser.parse_args()
    # Otherwise every setting at its default; only a shared engine has an inference process to kill.
    env = {**harness.SERVICE_DEFAULTS, "VAE_MODELS": "mnist-vae", "VAE_ENGINE_PLACEMENT": "shared"}
    with tempfile.TemporaryDirectory() as tmp, \
            harness.start_server(harness.ROOT / "models", Path(tmp) / "server.log", env=env,
                                 ready_timeout=180) as server:
        result = asyncio.run(scenario(server))
        log = server.log()
    result.update({"command": "python scripts/reliability/kill_engine.py", "connections": CONNECTIONS,
                   "restart_logged": "died" in log, "tracebacks": log.count("Traceback")})
    statuses = set(result["statuses"])
    result["met"] = (result["first_503_after_s"] is not None and result["ready_again_after_s"] is not None
                     and statuses <= {"200", "503"} and result["answered_200_after_recovery"] > 0)
    print(json.dumps(result, indent=2))
    harness.write_json(args.out, result)


if __name__ == "__main__":
    main()
