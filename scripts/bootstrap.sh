#!/usr/bin/env bash
# Create .venv and install the project with the given extras (e.g. "train,test"); with "test", also the
# Python client (clients/python, the vae-client distribution).
# Idempotent: re-runs pip only when pyproject.toml, clients/python/pyproject.toml or the extras change.
#
# Serving alone (no extras) needs no torch. With an extra that needs it (train, torchscript), torch is
# installed first, pinned ($VAE_TORCH_SPEC, default torch==2.13.0), so resolving the project's
# `torch>=2.4` range later installs nothing more. On this project's CPU machines the pin
# resolves to a local CPU wheel (pip's find-links), so no CUDA wheels are downloaded; on a GPU
# machine it resolves to the CUDA build from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
venv="${VAE_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_spec="${VAE_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$(cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
    exit 0
fi

pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
needs_torch=false
case ",$extras," in *,train,*|*,torchscript,*) needs_torch=true ;; esac
if $needs_torch && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "bootstrap: installing $torch_spec" >&2
    # shellcheck disable=SC2086  # unquoted on purpose: the spec may carry pip options
    "${pip[@]}" $torch_spec
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "bootstrap: installing the project ($target)" >&2
"${pip[@]}" -e "$target"
# The Python client is its own distribution (clients/python: httpx, numpy, Pillow); tests/client need it.
case ",$extras," in *,test,*)
    echo "bootstrap: installing the client (clients/python)" >&2
    "${pip[@]}" -e clients/python ;;
esac
rm -f "$venv"/.installed-*
touch "$stamp"
