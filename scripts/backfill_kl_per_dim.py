"""Copy `kl_per_dim` from an artifact's own report (report/report.json) into its manifest's metrics.

Exports since the explorer (issue 18) write it themselves (training/pipeline.py); this brings the
committed models, exported before, to the same form without touching their weights or checksummed
files (the manifest's `files` section does not cover the manifest itself).

    python scripts/backfill_kl_per_dim.py models/mnist-vae/1 models/mnist-vae/2
"""

import json
import sys
from pathlib import Path


def backfill(artifact: Path) -> bool:
    manifest_path = artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    report = json.loads((artifact / "report" / "report.json").read_text())
    kl = report.get("kl_per_dim")
    if kl is None or manifest.get("metrics", {}).get("kl_per_dim") == kl:
        return False
    if len(kl) != manifest["model"]["latent_dim"]:
        dims = manifest["model"]["latent_dim"]
        raise SystemExit(f"{artifact}: report has {len(kl)} KL values for {dims} dims")
    manifest.setdefault("metrics", {})["kl_per_dim"] = kl
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return True


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, "updated" if backfill(Path(arg)) else "unchanged")
