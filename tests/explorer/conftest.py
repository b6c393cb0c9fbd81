"""The explorer's browser tests use the shared process harness (scripts/reliability/harness.py) and the
shared browser helper (scripts/browser.py); the artifacts (`models_dir`) come from tests/conftest.py."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
for folder in (SCRIPTS, SCRIPTS / "reliability"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
