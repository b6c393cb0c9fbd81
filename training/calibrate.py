"""Re-calibrate the anomaly scores of an exported artifact in place; its graphs (weights) stay as they are.

    python -m training calibrate models/mnist-vae/1 [--k 256] [--seed 0] [--anomaly-method fisher]

For artifacts calibrated before a change of the scoring pipeline (the noise scheme, a new method) or with
the retired percentile calibration. The data split comes from the manifest's training config, so the
calibration, validation and training images are the ones the export would use; the scores come from the
service's own pipeline (training/scoring.py). The manifest's `anomaly` object, the latent bank and the
checksums are rewritten; the manifest is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from service.artifacts import LATENT_BANK_FILE, load_manifest, sha256_file
from training.evaluate import json_safe
from training.export import ANOMALY_ALPHA, calibrate_anomaly
from training.scoring import GraphScorer
from training.train import load_dataset_for

log = logging.getLogger(__name__)


def recalibrate(artifact: Path, *, k: int | None = None, seed: int | None = None,
                anomaly_method: str | None = None, alpha: float | None = None, threads: int = 1) -> dict:
    """Rewrite `artifact`'s anomaly calibration (k, seed, method and alpha default to its current ones)."""
    m = load_manifest(Path(artifact), "onnx")
    config = (m.raw.get("training") or {}).get("config")
    if not config:
        raise ValueError(f"{artifact}: the manifest has no training config, so its data split is unknown")
    old = m.raw.get("anomaly") or {}
    k = k or old.get("k") or 256
    seed = seed if seed is not None else old.get("seed", 0)
    method = anomaly_method or old.get("default_method", "nll")
    alpha = alpha or old.get("alpha", ANOMALY_ALPHA)
    splits = load_dataset_for(config)
    scorer = GraphScorer.from_artifact(m.directory, threads=threads)
    log.info("calibrating %s:%s (k=%d, seed=%d, default method %s)", m.name, m.version, k, seed, method)
    record = calibrate_anomaly(m.directory, scorer, splits, k, seed, method, alpha)
    raw = dict(m.raw)
    raw.pop("calibration", None)  # the retired percentile calibration
    raw["anomaly"] = record
    files = dict(raw["files"])
    files[LATENT_BANK_FILE] = sha256_file(m.directory / LATENT_BANK_FILE)
    raw["files"] = dict(sorted(files.items()))
    tmp = m.directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(json_safe(raw), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, m.directory / "manifest.json")
    load_manifest(m.directory, "onnx")  # the rewritten artifact still verifies
    return record


def add_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate",
                         help="re-calibrate an artifact's anomaly scores in place (weights unchanged)")
    cal.add_argument("artifact", type=Path, help="a version folder, e.g. models/mnist-vae/1")
    cal.add_argument("--k", type=int, help="importance samples per score (default: the artifact's, else 256)")
    cal.add_argument("--seed", type=int,
                     help="noise seed of the calibration (default: the artifact's, else 0)")
    cal.add_argument("--anomaly-method", help="default anomaly method (default: the artifact's, else nll)")
    cal.add_argument("--alpha", type=float, help="suggested level (default: the artifact's, else 0.01)")
    cal.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")


def main_from_args(args: argparse.Namespace) -> None:
    record = recalibrate(args.artifact, k=args.k, seed=args.seed, anomaly_method=args.anomaly_method,
                         alpha=args.alpha, threads=args.threads)
    print(json.dumps({"artifact": str(args.artifact), "default_method": record["default_method"],
                      "k": record["k"], "methods": sorted(record["methods"])}))
