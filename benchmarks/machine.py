"""What the numbers were measured on: CPU, cores, load, memory, library versions, git commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("onnxruntime", "onnxruntime-gpu", "torch", "numpy", "fastapi", "starlette", "uvicorn", "httpx",
            "pillow", "python-multipart", "pydantic", "uvloop", "httptools")


def cpu_model() -> str:
    """The `model name` line of /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def memory_gib() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def gpus() -> list[str]:
    """GPU names from nvidia-smi; empty on machines without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + (" (uncommitted changes in the tree)" if dirty else "")


def busiest_processes(limit: int = 5) -> list[str]:
    """The other work on the machine while we measure (`ps` by CPU share), to label a loaded machine."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] != str(me):
            rows.append(f"{parts[0]}% {parts[2][:100]}")
        if len(rows) >= limit:
            break
    return rows


def machine_info(root: Path) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "memory_gib": memory_gib(),
        "gpus": gpus(),
        "platform": platform.platform(),
        "load_average_1_5_15": load_average(),
        "busiest_processes": busiest_processes(),
        "versions": versions(),
        "git_commit": git_commit(root),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def machine_tag(info: dict[str, Any]) -> str:
    """A file-name tag like `amd-epyc-2c` or `nvidia-h100-80gb-hbm3-16c`."""
    name = info["gpus"][0] if info["gpus"] else info["cpu_model"]
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+-core\b", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"{slug}-{info['cores']}c"
