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
import shutil
from pathlib import Path

from service.artifacts import load_manifest
from training.evaluate import json_safe
from training.export import ANOMALY_ALPHA, calibrate_anomaly, file_checksums
from training.scoring import GraphScorer
from training.train import load_dataset_for

log = logging.getLogger(__name__)


def recalibrate(artifact: Path, *, k: int | None = None, seed: int | None = None,
                anomaly_method: str | None = None, alpha: float | None = None, threads: int = 1,
                data: str | None = None) -> dict:
    """Rewrite `artifact`'s anomaly calibration (k, seed, method and alpha default to its current ones; a
    method the export chose with "auto" is chosen again). data: where the training data is now."""
    m = load_manifest(Path(artifact), "onnx")
    config = (m.raw.get("training") or {}).get("config")
    if not config:
        raise ValueError(f"{artifact}: the manifest has no training config, so its data split is unknown")
    old = m.raw.get("anomaly") or {}
    retired = m.raw.get("calibration") or {}  # the percentile calibration of older artifacts
    k = k or old.get("k") or retired.get("k") or 256
    seed = seed if seed is not None else old.get("seed", config.get("seed", 0))  # export: the training seed
    method = anomaly_method or ("auto" if "selection" in old else old.get("default_method", "nll"))
    alpha = alpha or old.get("alpha", ANOMALY_ALPHA)
    splits = load_dataset_for(config, data, (m.raw.get("data") or {}).get("spec"))
    log.info("calibrating %s:%s (k=%d, seed=%d, default method %s)", m.name, m.version, k, seed, method)
    # Work on a copy, so a service or test reading the folder meanwhile never sees a half-written
    # artifact (the latent bank is written long before the manifest); a folder named ".*" is never served.
    staging = m.directory.parent.parent / ".recalibrating"
    work = staging / m.name / m.version  # the manifest's name and version must match the folders
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(m.directory, work)
    try:
        scorer = GraphScorer.from_artifact(work, threads=threads)
        record = calibrate_anomaly(work, scorer, splits, k, seed, method, alpha)
        raw = dict(m.raw)
        raw.pop("calibration", None)  # the retired percentile calibration
        raw["anomaly"] = record
        write_manifest(work, raw)
        old = m.directory.parent / f".{m.directory.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(m.directory, old)
        os.rename(work, m.directory)
        shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def write_manifest(directory: Path, raw: dict) -> None:
    """Replace manifest.json atomically, with the checksums of every file in the folder (as the exporter
    lists them), then check that the artifact verifies."""
    raw = {**raw, "files": file_checksums(directory)}
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(json_safe(raw), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, directory / "manifest.json")
    load_manifest(directory, "onnx")


def rehash(artifact: Path) -> None:
    """Re-checksum an artifact after its report changed (e.g. ood-eval wrote report/ood)."""
    raw = json.loads((Path(artifact) / "manifest.json").read_text())
    write_manifest(Path(artifact), raw)


def add_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate",
                         help="re-calibrate an artifact's anomaly scores in place (weights unchanged)")
    cal.add_argument("artifact", type=Path, help="a version folder, e.g. models/mnist-vae/1")
    cal.add_argument("--k", type=int, help="importance samples per score (default: the artifact's, else 256)")
    cal.add_argument("--seed", type=int,
                     help="noise seed of the calibration (default: the artifact's, else its training seed)")
    cal.add_argument("--anomaly-method",
                     help="default anomaly method, or auto (default: the artifact's; chosen again if auto)")
    cal.add_argument("--alpha", type=float, help="suggested level (default: the artifact's, else 0.01)")
    cal.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    cal.add_argument("--data", help="where the training data is now, if it moved (e.g. folder:/data/shapes)")
    cal.add_argument("--checksums-only", action="store_true",
                     help="only re-checksum the folder's files (after a report was updated)")


def main_from_args(args: argparse.Namespace) -> None:
    if args.checksums_only:
        rehash(args.artifact)
        return
    record = recalibrate(args.artifact, k=args.k, seed=args.seed, anomaly_method=args.anomaly_method,
                         alpha=args.alpha, threads=args.threads, data=args.data)
    print(json.dumps({"artifact": str(args.artifact), "default_method": record["default_method"],
                      "k": record["k"], "methods": sorted(record["methods"])}))
