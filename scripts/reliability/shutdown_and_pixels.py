"""Long variants of two reliability targets, on the committed model with default settings (JSON results):

1. every way a shutdown signal arrives (the supervisor, the process group, one HTTP worker, the inference
   process of a shared engine; SIGTERM and SIGINT) with 16 log-likelihood requests (k = 2000) in flight:
   what they get and the exit status (tests/reliability/test_rel_shutdown.py is the CI-sized form);
2. the issue's hostile V2 request: 64 PNGs of 3990x3990 (16M pixels each, a few KB each) as one BYTES
   tensor from the stock tritonclient: status, time to the answer, HTTP workers' RSS
   (tests/reliability/test_rel_hostile.py::test_the_pixel_budget_holds_on_every_protocol is the CI form).

    python scripts/reliability/shutdown_and_pixels.py [--model mnist-vae] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
IN_FLIGHT = 16
K = 2000


def _to_engine(server: harness.Server) -> None:
    os.kill(harness.engine_pids(server.log())[-1], signal.SIGTERM)


def _deliveries() -> dict[str, Callable[[harness.Server], None]]:
    def to_worker(server: harness.Server) -> None:
        os.kill(harness.worker_pids(server.log())[0], signal.SIGTERM)

    return {
        "SIGTERM to the supervisor": lambda s: os.kill(s.pid, signal.SIGTERM),
        "SIGTERM to the process group": lambda s: os.killpg(s.pid, signal.SIGTERM),
        "SIGINT to the process group": lambda s: os.killpg(s.pid, signal.SIGINT),
        "SIGTERM to one HTTP worker": to_worker,
        "SIGTERM to the inference process (VAE_ENGINE_PLACEMENT=shared)": _to_engine,
    }


def shutdown(models_dir: Path, model: str, tmp: Path, name: str,
             deliver: Callable[[harness.Server], None]) -> dict[str, Any]:
    env = {"VAE_MODELS": model}
    if deliver is _to_engine:  # only a shared engine has an inference process (the default on a GPU)
        env["VAE_ENGINE_PLACEMENT"] = "shared"
    with harness.start_server(models_dir, tmp / f"{name}.log", env=env, ready_timeout=180) as server:
        body, ctype = harness.multipart([(harness.ROOT / "docs" / "examples" / "digit.png").read_bytes()])
        path = f"/v1/models/{model}/log-likelihood?k={K}&seed=0"
        request = harness.post_bytes(path, server.port, body, ctype)

        async def run() -> tuple[list[int], float]:
            t0 = time.monotonic()
            tasks = [asyncio.create_task(harness._one(server.port, request, t0, 120))
                     for _ in range(IN_FLIGHT)]
            for _ in range(400):  # until every request is inside the service (bounded)
                metrics = await asyncio.to_thread(harness.scrape, server.url)
                if metrics["vae_inflight_requests"] >= IN_FLIGHT:
                    break
                await asyncio.sleep(0.05)
            deliver(server)
            signalled = time.monotonic()
            outcomes = await asyncio.gather(*tasks)
            return [o.status for o in outcomes], signalled

        statuses, signalled = asyncio.run(run())
        code = server.proc.wait(timeout=120)
        exited = time.monotonic() - signalled
        log = server.log()
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    return {"statuses": counts, "exit_status": code, "exited_after_s": round(exited, 2),
            "traceback_in_log": "Traceback" in log, "met": counts == {"200": IN_FLIGHT} and code == 0}


def v2_pixels(models_dir: Path, model: str, tmp: Path) -> dict[str, Any]:
    import tritonclient.http as triton

    buf = io.BytesIO()
    Image.new("L", (3990, 3990), 200).save(buf, "PNG")
    big = buf.getvalue()
    env = {"VAE_MODELS": model}
    with harness.start_server(models_dir, tmp / "v2.log", env=env, ready_timeout=180) as server:
        time.sleep(1.0)
        pids = harness.worker_pids(server.log())
        before = sum(harness.rss_mb(pid) for pid in pids)
        client = triton.InferenceServerClient(f"{harness.HOST}:{server.port}", network_timeout=120)
        tensor = triton.InferInput("png", [64], "BYTES")
        tensor.set_data_from_numpy(np.array([big] * 64, dtype=np.object_), binary_data=True)
        started = time.monotonic()
        try:
            client.infer(f"{model}.encode", [tensor])
            status, message = 200, ""
        except triton.InferenceServerException as exc:
            status, message = int(exc.status()), exc.message()
        took = time.monotonic() - started
        client.close()
        after = sum(harness.rss_mb(pid) for pid in harness.worker_pids(server.log()))
    return {"image_bytes": len(big), "body_bytes": 64 * len(big), "status": status,
            "message": message[:200], "seconds": round(took, 3), "workers_rss_before_mb": round(before, 1),
            "workers_rss_after_mb": round(after, 1),
            "met": status == 413 and took < 0.5 and after - before <= 50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=harness.ROOT / "models")
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--out", type=Path, default=RESULTS / "shutdown_and_pixels.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"command": "python scripts/reliability/shutdown_and_pixels.py",
                               "in_flight": IN_FLIGHT, "k": K, "model": args.model, "shutdown": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, deliver in _deliveries().items():
            tag = name.replace(" ", "-")
            results["shutdown"][name] = shutdown(args.models_dir, args.model, Path(tmp), tag, deliver)
            print(name, results["shutdown"][name], flush=True)
        results["v2_png_pixels"] = v2_pixels(args.models_dir, args.model, Path(tmp))
        print("V2 png", results["v2_png_pixels"], flush=True)
    harness.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
