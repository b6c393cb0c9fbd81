"""Long variant of the rollout target: a new version of the committed default model appears while
1-image encodes run at 64 connections (hey); SIGHUP; how long until the new version is the default, and
whether any encode failed during the switch. tests/reliability/test_rel_rollout.py is the CI form.

    python scripts/reliability/rollout.py [--seconds 20] [--out FILE]     (needs hey: benchmarks/setup.sh)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness
import httpx

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "rollout.json")
    args = parser.parse_args()
    source = harness.ROOT / "models" / "mnist-vae"
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(source, models / "mnist-vae")
        latest = max((p.name for p in (models / "mnist-vae").iterdir()), key=int)
        new = str(int(latest) + 1)
        body = Path(tmp) / "body.json"
        digit = (harness.ROOT / "docs" / "examples" / "digit.png").read_bytes()
        body.write_text(json.dumps({"images": [base64.b64encode(digit).decode()]}))
        env = {"VAE_THREADS": "0"}  # every setting at its default (the harness pins threads for tests)
        with harness.start_server(models, Path(tmp) / "server.log", env=env, ready_timeout=180) as server:
            url = server.url
            hey: dict[str, Any] = {}
            command = ["hey", "-z", f"{args.seconds}s", "-c", "64", "-m", "POST", "-T", "application/json",
                       "-D", str(body), f"{url}/v1/models/mnist-vae/encode"]
            thread = threading.Thread(target=lambda: hey.update(
                out=subprocess.run(command, capture_output=True, text=True, check=True).stdout))
            thread.start()
            time.sleep(args.seconds / 4)
            target = models / "mnist-vae" / new
            shutil.copytree(models / "mnist-vae" / latest, target)
            manifest = json.loads((target / "manifest.json").read_text())
            manifest["version"] = new
            (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
            os.kill(server.pid, signal.SIGHUP)
            signalled = time.monotonic()
            switched_after = None
            while time.monotonic() - signalled < 60:
                answers = {httpx.get(f"{url}/v1/models/mnist-vae", timeout=5).json()["version"]
                           for _ in range(8)}
                if answers == {new}:
                    switched_after = time.monotonic() - signalled
                    break
                time.sleep(0.05)
            thread.join()
            log = server.log()
    statuses = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[(\d+)\]\s+(\d+) responses", hey["out"])}
    rate_match = re.search(r"Requests/sec:\s+([0-9.]+)", hey["out"])
    rate = float(rate_match.group(1)) if rate_match else None
    switched = None if switched_after is None else round(switched_after, 2)
    result = {"command": "python scripts/reliability/rollout.py", "seconds": args.seconds, "connections": 64,
              "new_version": new, "default_after_sighup_s": switched, "statuses": statuses,
              "requests_per_s": rate,
              "loaded_line": [line[-160:] for line in log.splitlines() if "now serving" in line],
              "met": switched is not None and switched < 10 and set(statuses) == {"200"}}
    print(json.dumps(result, indent=2))
    harness.write_json(args.out, result)


if __name__ == "__main__":
    main()
