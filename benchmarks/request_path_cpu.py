"""CPU per request of the service's own request path, in-process: no sockets, no HTTP parser, no load
generator sharing the cores, so a change to the Python path is measured without the VM's noise.

The whole ASGI app (request middleware, fast path, operation, model, batcher, ONNX Runtime on a
thread) answers `--concurrency` 1-image requests at a time, `--iterations` times, after a warm-up;
each setting runs in a fresh interpreter, settings alternating round by round. Settings:
- `python`: CPython's garbage collector as it starts;
- `settled`: service/gc_tuning.settle() after start-up, as the serving processes do.
Reports the CPU seconds per request (process time: every thread) and the time spent in each
generation's collections, and writes <output-dir>/request_path_cpu-<machine tag>.json.

    .venv/bin/python benchmarks/request_path_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import machine_info, machine_tag

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("python", "settled")


def measure(setting: str, route: str, concurrency: int, iterations: int, model: str) -> dict[str, Any]:
    """One fresh app in this process: CPU per request and collector time per request, by generation."""
    sys.path.insert(0, str(ROOT))
    import logging

    import uvloop
    from payloads import build_bodies, real_digits

    from service import gc_tuning
    from service.api.app import create_app
    from service.config import Settings
    from service.logs import configure_logging

    configure_logging("INFO", False)  # the access log as the servers write it, to /dev/null
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open("/dev/null", "w"))  # noqa: SIM115 (open for the whole run)
    name, _, version = model.partition(":")
    manifest = json.loads((ROOT / "models" / name / version / "manifest.json").read_text())
    shape = manifest["input"]
    digits = real_digits(shape["height"], shape["width"], "L" if shape["channels"] == 1 else "RGB", limit=1)
    body = build_bodies(digits, 1, "json-base64", 1)[0].content
    path = f"/v1/models/{name}/{route}"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode()),
                         (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}

    async def one(app: Any) -> None:
        answered = asyncio.Event()
        sent = False
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif not message.get("more_body", False):
                answered.set()

        await app(dict(scope, state={}), receive, send)
        assert status == [200], status

    collections: dict[str, Any] = {"runs": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "started": 0.0}

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections["started"] = time.perf_counter()
        else:
            collections["runs"][info["generation"]] += 1
            collections["seconds"][info["generation"]] += time.perf_counter() - collections["started"]

    async def run() -> dict[str, Any]:
        app = create_app(Settings(models=[model], threads=1))
        async with app.router.lifespan_context(app):
            for _ in range(20):
                await asyncio.gather(*(one(app.front) for _ in range(concurrency)))
            if setting == "settled":
                gc_tuning.settle()
            gc.callbacks.append(on_collection)
            cpu = time.process_time()
            for _ in range(iterations):
                await asyncio.gather(*(one(app.front) for _ in range(concurrency)))
            cpu = time.process_time() - cpu
            gc.callbacks.remove(on_collection)
        n = concurrency * iterations
        return {"setting": setting, "requests": n, "cpu_us_per_request": cpu / n * 1e6,
                "collections": collections["runs"],
                "collection_us_per_request": [s / n * 1e6 for s in collections["seconds"]]}

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", default="encode")
    parser.add_argument("--model", default="mnist-vae:1")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)  # a child's single measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.route, args.concurrency, args.iterations, args.model)))
        return
    machine = machine_info(ROOT)
    runs = []
    for r in range(args.rounds):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            child = [sys.executable, __file__, "--one", setting, "--route", args.route, "--model", args.model,
                     "--concurrency", str(args.concurrency), "--iterations", str(args.iterations)]
            done = subprocess.run(child, capture_output=True, text=True, check=True, cwd=ROOT)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{setting:8} {run['cpu_us_per_request']:7.1f} us CPU per request; collections by "
                  f"generation {run['collections']}, "
                  f"{' / '.join(f'{us:.1f}' for us in run['collection_us_per_request'])} us per request")
    summary = {s: statistics.median(r["cpu_us_per_request"] for r in runs if r["setting"] == s)
               for s in SETTINGS}
    for setting, us in summary.items():
        print(f"median {setting:8} {us:7.1f} us CPU per request")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"request_path_cpu-{machine_tag(machine)}.json"
    out.write_text(json.dumps({"command": "python benchmarks/request_path_cpu.py " + " ".join(sys.argv[1:]),
                               "machine": machine, "route": args.route, "model": args.model,
                               "concurrency": args.concurrency, "iterations": args.iterations,
                               "median_cpu_us_per_request": summary, "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
