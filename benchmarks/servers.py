"""Servers under test as subprocesses: start, wait for /readyz, watch their CPU and metrics, SIGTERM.

Each server logs to its own file (never a pipe nobody reads, which would block it once full).
Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sched_seconds(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting-for-a-CPU) seconds summed over the threads of `pid`, from /proc/.../schedstat.

    The second figure is time the threads were runnable but not running: on a loaded machine it says
    how much CPU a process wanted and did not get. Threads that already exited are not counted.
    """
    run = wait = 0.0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            fields = stat.read_text().split()
        except OSError:
            continue
        run += int(fields[0]) / 1e9
        wait += int(fields[1]) / 1e9
    return run, wait


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One server process; `name` is its configuration (batching-on, batching-off, plain)."""

    name: str
    command: list[str]
    env: dict[str, str]  # what differs from the inherited environment
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    stop_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, cwd: Path) -> None:
        env = {**os.environ, **self.env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([*self.command, "--host", HOST, "--port", str(self.port)],
                                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        """Poll GET /readyz until 200; raise (with the log's tail) if it exits or takes too long."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads, also exited ones) so far."""
        assert self.process is not None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def cpu_wait_seconds(self) -> float:
        assert self.process is not None
        return sched_seconds(self.process.pid)[1]

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM and wait (the service drains and should exit 0); SIGKILL only if it hangs."""
        if self.process is None or self.process.poll() is not None:
            self.exit_code = None if self.process is None else self.process.returncode
            return
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait(10)
        self.stop_seconds = round(time.monotonic() - started, 2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def service_server(name: str, env: dict[str, str], log_dir: Path) -> Server:
    return Server(name, [sys.executable, "-m", "service"], env, log_dir / f"{name}.log")


def plain_server(name: str, models_dir: Path, model: str, threads: int, device: str, log_dir: Path) -> Server:
    script = Path(__file__).with_name("plain_server.py")
    command = [sys.executable, str(script), "--models-dir", str(models_dir), "--model", model,
               "--threads", str(threads), "--device", device]
    return Server(name, command, {}, log_dir / f"{name}.log")


# -- the service's Prometheus metrics, to see what batches it formed -----------------------------------
_SAMPLE_RE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
_WATCHED = ("vae_batch_size_rows_sum", "vae_batch_size_rows_count", "vae_compute_duration_seconds_sum",
            "vae_queue_duration_seconds_sum", "vae_queue_duration_seconds_count")


def scrape_batch_metrics(base_url: str) -> dict[str, dict[str, float]]:
    """{graph: {metric: value}} for the batching metrics; empty when the server has no /metrics."""
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=10.0, trust_env=False)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    out: dict[str, dict[str, float]] = {}
    for line in response.text.splitlines():
        match = _SAMPLE_RE.match(line)
        if not match or match["name"] not in _WATCHED:
            continue
        graph = dict(_LABEL_RE.findall(match["labels"])).get("graph", "?")
        out.setdefault(graph, {})[match["name"]] = float(match["value"])
    return out


MetricValues = dict[str, dict[str, float]]  # graph -> metric -> value


def metric_deltas(before: MetricValues, after: MetricValues,
                  into: MetricValues | None = None) -> MetricValues:
    """after - before per graph and metric, added to `into` (to pool repeats of a level)."""
    out = into if into is not None else {}
    for graph, now in after.items():
        for name, value in now.items():
            out.setdefault(graph, {}).setdefault(name, 0.0)
            out[graph][name] += value - before.get(graph, {}).get(name, 0.0)
    return out


def batch_activity(deltas: MetricValues, wall_s: float) -> dict[str, Any]:
    """Per graph: batches run, mean rows per batch, device busy share of the wall time, mean queue wait."""
    activity = {}
    for graph, d in deltas.items():
        batches = d.get("vae_batch_size_rows_count", 0.0)
        if batches <= 0:
            continue
        waits = d.get("vae_queue_duration_seconds_count", 0.0)
        activity[graph] = {
            "batches": int(batches),
            "mean_batch_rows": round(d.get("vae_batch_size_rows_sum", 0.0) / batches, 2),
            "device_busy": round(d.get("vae_compute_duration_seconds_sum", 0.0) / wall_s, 3),
            "mean_queue_wait_ms": round(1000 * d.get("vae_queue_duration_seconds_sum", 0.0) / waits, 2)
            if waits else None,
        }
    return activity
