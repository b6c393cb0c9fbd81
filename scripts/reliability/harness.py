"""Tools shared by the tests (tests/reliability, tests/service, tests/client), the reliability scripts
(burst.py, soak.py, hostile.py, ...) and the serving benchmark (benchmarks/serving_servers.py).

The process harness is here once: a free port, a server spawned as its own process group
(`spawn`), waiting for its readiness route (`wait_until_ready`) and killing the whole tree
(`kill_tree`). Everything talks real HTTP to real processes on 127.0.0.1 (never elsewhere), and every
loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
FAULTY_SERVICE = Path(__file__).resolve().parent / "faulty_service.py"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc (no psutil)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def scrape(base_url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (labels as the server wrote them)."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def tiny_image_body(n: int = 1) -> dict[str, Any]:
    """JSON arrays for an 8x8 grey model: n all-0.5 images."""
    return {"inputs": [[[[0.5] * 8] * 8]] * n}


@dataclass
class Server:
    """A `python -m service` subprocess (through faulty_service.py) on a free port."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def wait_ready(self, timeout: float = 90.0) -> None:
        wait_until_ready(self.proc, f"{self.url}/readyz", self.log_path, timeout)

    def sigterm(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()


# Pass in `env` to undo start_server's pins and run the service's own defaults (long-variant scripts).
SERVICE_DEFAULTS = {"VAE_THREADS": "0", "VAE_DEVICE_INSTANCES": "0"}


@contextmanager
def start_server(models_dir: Path, log_path: Path, env: dict[str, str] | None = None,
                 batch_delay_s: float = 0.0, wait: bool = True,
                 ready_timeout: float = 90.0) -> Iterator[Server]:
    """Start the service as a subprocess; on exit kill it if it is still running."""
    port = free_port()
    # One execution thread: simulated device time (batch_delay_s) then models one busy device.
    full_env = {**os.environ, "VAE_THREADS": "1", "VAE_DEVICE_INSTANCES": "1", "VAE_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                "RELIABILITY_BATCH_DELAY_S": str(batch_delay_s), **(env or {})}
    proc = spawn([sys.executable, str(FAULTY_SERVICE), "--host", HOST, "--port", str(port),
                  "--models-dir", str(models_dir)], log_path, full_env)
    server = Server(proc, port, log_path)
    try:
        if wait:
            server.wait_ready(ready_timeout)
        yield server
    finally:
        kill_tree(proc)


def spawn(command: list[str], log_path: Path, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """Start a server from the repository root (or `cwd`: another checkout's `python -m service`),
    stdout and stderr to `log_path`, in its own process group: the children it forks (HTTP workers,
    inference process, a peer's workers) share it, so kill_tree can end the whole tree (killing only
    the leader orphans them)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until_ready(proc: subprocess.Popen, ready_url: str, log_path: Path, timeout: float) -> float:
    """Poll `ready_url` until it answers 200; the seconds that took. RuntimeError with the log's tail
    if the process exits first or the timeout passes."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{_tail(log_path)}")
        time.sleep(0.1)


def _tail(log_path: Path, chars: int = 4000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the server's whole process group (supervisor and children), whether or not it still runs."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# -- load generation --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (transport error)
    latency_s: float
    error: str = ""
    sent_at: float = 0.0  # seconds since the start of the run


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    duration_s: float = 0.0

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            key = str(o.status) if o.status is not None else "no_answer"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def latencies(self, status: int) -> list[float]:
        return [o.latency_s for o in self.outcomes if o.status == status]

    @property
    def answered(self) -> int:
        return sum(o.status is not None for o in self.outcomes)


def encode_request(method: str, path: str, port: int, body: Any = None, headers: dict[str, str] | None = None
                   ) -> bytes:
    """One HTTP/1.1 request with `Connection: close` (each burst request is a new caller)."""
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             f"Content-Length: {len(payload)}"]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def read_until_close(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes, a reset or `timeout`, whichever comes first.

    What arrived before a reset is kept. A server that answers before reading the whole request
    (408 to a trickling upload, 503 while draining) and then closes resets the connection for the
    unread bytes, right after its answer; StreamReader.read() would drop that answer with the error.
    """
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except (OSError, TimeoutError):
        pass
    return b"".join(chunks)


async def raw_request(port: int, request: bytes, timeout: float) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer (the server closes); (status, raw response)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        data = await read_until_close(reader, timeout)  # until EOF: Connection: close
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no HTTP answer ({len(data)} bytes)")
    return int(data[9:12]), data


async def timed_request(port: int, request: bytes, timeout: float = 30.0
                        ) -> tuple[int | None, dict[str, str], bytes, float]:
    """(status or None when no HTTP answer, headers, body, seconds) of one raw request."""
    started = time.monotonic()
    try:
        status, raw = await raw_request(port, request, timeout)
    except (OSError, TimeoutError, ConnectionError):
        return None, {}, b"", time.monotonic() - started
    headers, body = split_response(raw)
    return status, headers, body, time.monotonic() - started


async def _one(port: int, request: bytes, t0: float, timeout: float) -> Outcome:
    """A bare asyncio client: little client CPU per request, so the client is not the bottleneck."""
    started = time.monotonic()
    try:
        status, _ = await raw_request(port, request, timeout)
        return Outcome(status, time.monotonic() - started, sent_at=started - t0)
    except (OSError, TimeoutError, ConnectionError) as exc:
        return Outcome(None, time.monotonic() - started, f"{type(exc).__name__}: {exc}", started - t0)


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1].split("/")[0])


async def closed_loop(base_url: str, path: str, body: Any, concurrency: int, duration_s: float,
                      method: str = "POST", timeout: float = 30.0) -> RunResult:
    """`concurrency` workers send back to back for `duration_s`: measures capacity (answers/s)."""
    result = RunResult()
    port = _port(base_url)
    request = encode_request(method, path, port, body)
    t0 = time.monotonic()
    stop_at = t0 + duration_s

    async def worker() -> None:
        for _ in range(1_000_000):  # bounded; the time check ends it
            if time.monotonic() >= stop_at:
                return
            result.outcomes.append(await _one(port, request, t0, timeout))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.duration_s = time.monotonic() - t0
    return result


async def open_loop(base_url: str, path: str, body: Any, rate: float, count: int, method: str = "POST",
                    timeout: float = 30.0, sampler: Callable[[], None] | None = None) -> RunResult:
    """Send `count` requests at `rate` per second regardless of answers (an open-loop burst)."""
    result = RunResult()
    port = _port(base_url)
    request = encode_request(method, path, port, body)
    t0 = time.monotonic()
    tasks = []
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if sampler is not None and i % 20 == 0:
            sampler()
        tasks.append(asyncio.create_task(_one(port, request, t0, timeout)))
    for _ in range(int(timeout * 10) + 10):  # sample while the answers come in, bounded
        if all(t.done() for t in tasks):
            break
        if sampler is not None:
            sampler()
        await asyncio.sleep(0.1)
    result.outcomes = list(await asyncio.gather(*tasks))
    result.duration_s = time.monotonic() - t0
    return result


# -- scenarios shared by the CI test and the long script ----------------------------------------------------
BURST_ENV = {  # a small queue, small batches and simulated device time: the model is the bottleneck
    "VAE_MODELS": "tiny", "VAE_MAX_BATCH_SIZE": "4", "VAE_MAX_QUEUE_SIZE": "16", "VAE_MAX_IMAGES": "4",
    "VAE_MAX_N": "4", "VAE_MAX_QUEUE_DELAY_MS": "2", "VAE_LOG_LEVEL": "WARNING",
}
BURST_DELAY_S = 0.2
ENCODE = "/v1/models/tiny/encode"


def burst_scenario(server: Server, capacity_s: float = 3.0, burst_s: float = 1.5, factor: float = 10.0,
                   path: str = ENCODE, body: Any = None) -> dict[str, Any]:
    """Measure capacity closed-loop, then send `factor` x that rate open-loop; return the figures."""
    body = body if body is not None else tiny_image_body(1)
    baseline_rss = server.rss_mb()
    capacity_run = asyncio.run(closed_loop(server.url, path, body, concurrency=16, duration_s=capacity_s))
    capacity = len(capacity_run.latencies(200)) / capacity_run.duration_s
    rate = factor * capacity
    count = max(50, int(rate * burst_s))
    rss_samples: list[float] = []

    def sample() -> None:
        rss_samples.append(server.rss_mb())

    burst = asyncio.run(open_loop(server.url, path, body, rate=rate, count=count, sampler=sample))
    metrics = scrape(server.url)
    labels = '{graph="encoder",model="tiny",version="1"}'
    ok, rejected = burst.latencies(200), burst.latencies(429)
    return {
        "capacity_rps": round(capacity, 1),
        "capacity_p50_ms": round(1000 * percentile(capacity_run.latencies(200), 50), 1),
        "offered_rps": round(rate, 1),
        "achieved_send_rps": round(count / max(1e-9, max(o.sent_at for o in burst.outcomes)), 1),
        "sent": count,
        "answered": burst.answered,
        "statuses": burst.statuses(),
        "errors": sorted({o.error for o in burst.outcomes if o.error})[:5],
        "rejected_429_p50_ms": round(1000 * percentile(rejected, 50), 1),
        "rejected_429_p99_ms": round(1000 * percentile(rejected, 99), 1),
        "rejected_429_max_ms": round(1000 * max(rejected, default=math.nan), 1),
        "accepted_p50_ms": round(1000 * percentile(ok, 50), 1),
        "accepted_p99_ms": round(1000 * percentile(ok, 99), 1),
        "accepted_max_ms": round(1000 * max(ok, default=math.nan), 1),
        "queue_peak_rows": metrics.get(f"vae_queue_depth_peak_rows{labels}"),
        "queue_limit_rows": metrics.get(f"vae_queue_limit_rows{labels}"),
        "inflight_peak": metrics.get("vae_inflight_requests_peak"),
        "rss_baseline_mb": round(baseline_rss, 1),
        "rss_peak_mb": round(max(rss_samples, default=baseline_rss), 1),
        "rss_after_mb": round(server.rss_mb(), 1),
        "batch_delay_s": BURST_DELAY_S,
    }


def write_json(path: Path | str, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_test_models(dest: Path) -> Path:
    """Export the small `tiny` model of the test suite into dest/models (needs the training package)."""
    import torch

    import training.export as export
    from training.data import load_dataset
    from training.models import ModelConfig
    from training.train import TrainConfig, model_from_checkpoint, train

    torch.set_num_threads(1)
    splits = load_dataset("digits8")
    cfg = TrainConfig(data="digits8", out_dir=str(dest / "run-tiny"), progress=False, conditional=False,
                      epochs=2, model=ModelConfig(architecture="mlp", latent_dim=4, hidden_dim=64))
    vae, _ = model_from_checkpoint(train(cfg, splits=splits))
    export.export_model(vae, splits, dest / "models", "tiny", "1", calibration_k=16, anomaly_method="nll")
    return dest / "models"


# -- hostile clients (tests/reliability/test_rel_hostile.py and scripts/reliability/hostile.py) -----------
_WORKER_STARTED = re.compile(r"HTTP worker (\d+) started \(pid (\d+)\)")


_ENGINE_STARTED = re.compile(r"inference process started \(pid (\d+)\)")


def engine_pids(log: str) -> list[int]:
    """Pids of every inference process the supervisor started, in order, from its INFO log."""
    return [int(m.group(1)) for m in _ENGINE_STARTED.finditer(log)]


def worker_pids(log: str) -> list[int]:
    """The pid of the latest process of every HTTP worker, from the supervisor's INFO log."""
    latest: dict[int, int] = {}
    for m in _WORKER_STARTED.finditer(log):
        latest[int(m.group(1))] = int(m.group(2))
    return [latest[i] for i in sorted(latest)]


def split_response(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Raw HTTP/1.1 answer (Connection: close, not chunked) -> (lower-cased headers, body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


def misshaped_bodies(input_shape: tuple[int, int, int], latent_dim: int, size: int) -> dict[str, bytes]:
    """Two JSON bodies of about `size` bytes whose values are many but whose shape is wrong.

    inputs: arrays of H x W for a model of C x H x W (one nesting level missing); latents: rows of
    strings instead of numbers. Before issue 10 each cost tens of seconds and gigabytes to refuse.
    """
    _, h, w = input_shape
    image = json.dumps([[0.5] * w] * h).encode()
    inputs = b'{"inputs": [' + b", ".join([image] * (size // (len(image) + 2))) + b"]}"
    row = json.dumps(["x"] * latent_dim).encode()
    latents = b'{"latents": [' + b", ".join([row] * (size // (len(row) + 2))) + b"]}"
    return {"inputs": inputs, "latents": latents}


def post_bytes(path: str, port: int, body: bytes, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> bytes:
    """A POST of raw body bytes with `Connection: close`."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def multipart(files: list[bytes], boundary: str = "vae-hostile-boundary") -> tuple[bytes, str]:
    """(body, content type) of a multipart form with each file in the field `images`."""
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def stalled_upload(port: int, path: str, declared: int, first: bytes,
                         headers: dict[str, str] | None = None
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, send the headers of a `declared`-byte JSON body and its first bytes only."""
    reader, writer = await asyncio.open_connection(HOST, port)
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             "Content-Type: application/json", f"Content-Length: {declared}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
                      ) -> tuple[int | None, dict[str, str], bytes]:
    """Read until the server closes (bounded by `timeout`): (status or None, headers, body)."""
    try:
        data = await read_until_close(reader, timeout)
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None, {}, data
    headers, body = split_response(data)
    return int(data[9:12]), headers, body
