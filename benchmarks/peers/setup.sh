#!/usr/bin/env bash
# Makes .bench-peers-venv (gitignored) with the peers of the serving benchmark (BentoML, LitServe and
# their runtime, pinned in benchmarks/peers/requirements.txt), apart from the project's .venv so its
# dependencies stay clean. Idempotent: does nothing when the venv already has the pinned versions.
# PYTHON=python3.11 benchmarks/peers/setup.sh picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.bench-peers-venv
REQS=benchmarks/peers/requirements.txt
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if "$VENV/bin/python" - "$REQS" <<'PY'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        try:
            if metadata.version(name) != version:
                sys.exit(1)
        except metadata.PackageNotFoundError:
            sys.exit(1)
PY
then
    echo "$VENV: pinned peers already installed"
else
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$REQS"
fi
"$VENV/bin/python" -c "import bentoml, litserve, onnxruntime; print('bentoml', bentoml.__version__, \
'litserve', litserve.__version__, 'onnxruntime', onnxruntime.__version__)"
