"""The client is its own distribution (clients/python, vae-client): installable without the server stack.

Checked from the sources, without a package index: the distribution's declared dependencies, the
modules vae_client imports (each declared, none from this repository's server or training code), and
an import of vae_client in a fresh interpreter where `service` and `training` cannot be imported.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
SERVER_STACK = ("onnxruntime", "onnxruntime-gpu", "fastapi", "uvicorn", "starlette", "pydantic",
                "pydantic-settings", "pyzmq", "torch", "vae-serve")
DISTRIBUTION_OF = {"PIL": "pillow"}  # import name -> distribution name, where they differ


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _imported_top_level_modules() -> set[str]:
    """Every top-level module any vae_client source file imports (absolute imports; no relative ones)."""
    modules: set[str] = set()
    for path in (CLIENT / "vae_client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{path}: relative import"
                modules.add(node.module.split(".")[0])
    return modules


def _client_project() -> dict:
    return tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]


def test_the_client_distribution_declares_no_server_dependency() -> None:
    project = _client_project()
    assert project["name"] == "vae-client"
    declared = {_name(r) for r in project["dependencies"]}
    assert declared == {"httpx", "numpy", "pillow"}, declared
    assert not declared & set(SERVER_STACK), declared
    assert "optional-dependencies" not in project  # no extra may bring the server back
    from vae_client import __version__  # the User-Agent's version is the distribution's

    assert project["version"] == __version__


def test_vae_client_imports_only_what_it_declares_and_nothing_of_the_server() -> None:
    imported = _imported_top_level_modules()
    assert not imported & {"service", "training"}, imported
    outside = imported - set(sys.stdlib_module_names) - {"vae_client"}
    third_party = {DISTRIBUTION_OF.get(m, m) for m in outside}
    declared = {_name(r) for r in _client_project()["dependencies"]}
    assert third_party == declared, (third_party, declared)


def test_vae_client_imports_where_the_server_and_training_code_cannot() -> None:
    code = ("import sys; sys.modules['service'] = sys.modules['training'] = None; "
            f"sys.path.insert(0, {str(CLIENT)!r}); "
            "import vae_client, vae_client.aio, vae_client.client; "
            "assert vae_client.__file__.startswith(sys.path[0]), vae_client.__file__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{[m.replace('-', '_') for m in SERVER_STACK]!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # not one module of the server stack was loaded


def test_the_server_distribution_neither_ships_the_client_nor_offers_a_client_extra() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert "client" not in extras
    assert not any(_name(r).startswith("vae-") for reqs in extras.values() for r in reqs)
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(not p.startswith("vae_client") for p in packages), packages
    assert not (ROOT / "vae_client").exists()
