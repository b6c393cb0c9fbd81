"""The serving side needs no torch: its modules import and serve with torch blocked, pyproject.toml keeps
torch out of the base dependencies, and pip resolves the plain install without torch or CUDA wheels.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "training")

# Runs in a fresh interpreter: any import of torch or training (the training package imports torch)
# fails as if they were not installed, then the service is imported and serves one request.
SERVE_WITHOUT_TORCH = textwrap.dedent("""
    import importlib.abc
    import json
    import sys

    BLOCKED = {blocked!r}

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block torch")

    import service.__main__
    import service.api.app
    import service.api.worker
    import service.engine.server
    import service.supervisor
    from fastapi.testclient import TestClient
    from service.api.app import create_app
    from service.config import Settings

    settings = Settings(models_dir=sys.argv[1], models=["tiny"], runtime="onnx", device="cpu", threads=1,
                        log_level="WARNING")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        encode = client.post("/v1/models/tiny/encode", json={{"inputs": [[[[0.5] * 8] * 8]] * 2}})
        ll = client.post("/v1/models/tiny/log-likelihood?k=16&seed=0", json={{"inputs": [[[[0.5] * 8] * 8]]}})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"readyz": ready.status_code, "encode": encode.status_code,
                      "encode_body": encode.json(), "log_likelihood": ll.status_code,
                      "runtime": client.app.state.service.settings.runtime, "loaded": loaded}}))
""").format(blocked=BLOCKED)


def test_serving_modules_import_and_serve_with_torch_blocked(models_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "serve_without_torch.py"
    script.write_text(SERVE_WITHOUT_TORCH)
    done = subprocess.run([sys.executable, str(script), str(models_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["readyz"] == 200 and result["encode"] == 200 and result["log_likelihood"] == 200, result
    assert result["runtime"] == "onnx"
    results = result["encode_body"]["results"]
    assert len(results) == 2 and len(results[0]["mean"]) == 4, results
    assert result["loaded"] == [], result  # nothing of torch or training was imported


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def test_pyproject_base_dependencies_have_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    assert "torch" not in base and not any(n.startswith("nvidia-") for n in base), base
    assert {"fastapi", "numpy", "pyzmq"} <= base and any(n.startswith("onnxruntime") for n in base), base
    with_torch = {extra for extra, reqs in project["optional-dependencies"].items()
                  if "torch" in {_name(r) for r in reqs}}
    assert with_torch == {"torchscript", "train"}, with_torch


def test_pip_resolves_the_plain_install_without_torch_or_cuda(tmp_path: Path) -> None:
    """A real resolution (needs the package index; CI has it): no torch, no nvidia-* wheels."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report",
               str(report), "--quiet", "--disable-pip-version-check", str(ROOT)]
    try:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("pip did not resolve the plain install within 120 s: is the package index reachable? "
                    f"({' '.join(command)})")
    if done.returncode != 0 or not report.is_file():
        pytest.fail(f"pip could not resolve the plain install (exit {done.returncode}); it needs the package "
                    f"index, which CI has. Command: {' '.join(command)}\nstderr:\n{done.stderr[-4000:]}")
    installs = json.loads(report.read_text())["install"]
    names = sorted(re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower() for item in installs)
    print(f"\nplain install resolves to {len(names)} packages: {names}")
    assert "vae-serve" in names
    assert any(n.startswith("onnxruntime") for n in names), names
    assert "torch" not in names, names
    assert not [n for n in names if n.startswith("nvidia-") or n == "triton"], names
