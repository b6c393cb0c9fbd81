"""Runs `hey` (a Go HTTP load generator) for a bounded time against 127.0.0.1 and parses its summary.

hey is closed-loop: `-c` connections (keep-alive), each sending the next request when the previous
answer arrived, for `-z` seconds; the whole body comes from a file (`-D`). Its summary is parsed, not
its CSV: the CSV leaves out requests that failed without an HTTP answer (connection errors, timeouts),
which the summary counts in its error distribution. hey's latency percentiles cover every request
that got an HTTP answer, whatever its status (a non-2xx count is reported next to them).
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def hey_path() -> str:
    found = shutil.which("hey")
    if found is None:
        raise SystemExit("hey is not installed: run benchmarks/setup.sh (apt-get install -y hey wrk)")
    return found


def hey_version() -> str | None:
    """The Debian package version of hey (hey itself has no --version)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "hey"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def hey_command(url: str, body: Path | None, concurrency: int, seconds: float, timeout_s: int = 60,
                content_type: str = "application/json") -> list[str]:
    """POST `body` to url, or GET url when body is None."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"only {HOST} is measured, not {url}")
    request = ["-m", "GET"] if body is None else ["-m", "POST", "-T", content_type, "-D", str(body)]
    return [hey_path(), "-z", f"{seconds:g}s", "-c", str(concurrency), *request, "-t", str(timeout_s), url]


_FLOAT = r"([0-9.]+|NaN)"


def _seconds_ms(value: str | None) -> float | None:
    if value is None or value == "NaN":
        return None
    return round(1000 * float(value), 2)


def parse_summary(text: str) -> dict[str, Any]:
    """hey's text summary -> totals, requests/s, latency percentiles (ms), status codes, errors."""

    def field(name: str) -> str | None:
        match = re.search(rf"^\s*{re.escape(name)}:\s*{_FLOAT}", text, re.MULTILINE)
        return match.group(1) if match else None

    # hey prints a percentile only once it has enough answers (no p99 under 100 answers; it then prints
    # a bogus "0% in 0.0000" line, dropped here): a missing percentile stays None
    percentiles: dict[str, float | None] = {f"p{p}_ms": None for p in (10, 25, 50, 75, 90, 95, 99)}
    for p, v in re.findall(rf"^\s*(\d+)%+ in {_FLOAT} secs", text, re.MULTILINE):
        if int(p) > 0 and f"p{int(p)}_ms" in percentiles:
            percentiles[f"p{int(p)}_ms"] = _seconds_ms(v)
    status = {
        int(code): int(n) for code, n in re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", text, re.MULTILINE)
    }
    errors: dict[str, int] = {}
    if "Error distribution:" in text:
        for n, message in re.findall(
            r"^\s*\[(\d+)\]\s+(.+)$", text.split("Error distribution:", 1)[1], re.MULTILINE
        ):
            errors[message.strip()[:300]] = errors.get(message.strip()[:300], 0) + int(n)
    total_s = float(field("Total") or "nan")
    answered = sum(status.values())
    ok = sum(n for code, n in status.items() if 200 <= code < 300)
    return {
        "total_s": total_s,
        "requests_per_s_hey": float(field("Requests/sec") or "nan"),  # hey's figure: every request
        "answered": answered,
        "ok": ok,
        "non_2xx": answered - ok,
        "errors": sum(errors.values()),
        "ok_per_s": round(ok / total_s, 2) if total_s > 0 else None,
        "mean_ms": _seconds_ms(field("Average")),
        "fastest_ms": _seconds_ms(field("Fastest")),
        "slowest_ms": _seconds_ms(field("Slowest")),
        **percentiles,
        "status_codes": {str(k): v for k, v in sorted(status.items())},
        "error_distribution": errors,
    }


def run_hey(url: str, body: Path | None, concurrency: int, seconds: float,
            content_type: str = "application/json") -> dict[str, Any]:
    """One bounded hey run; its parsed summary, its command line and the CPU it used itself."""
    command = hey_command(url, body, concurrency, seconds, content_type=content_type)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"hey failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-2000:]}")
    parsed = parse_summary(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        **parsed,
        "command": " ".join(command),
        "wall_s": round(wall, 2),
        "hey_cpu_cores": round(cpu / wall, 2) if wall > 0 else None,
        "summary_text": proc.stdout,
    }
