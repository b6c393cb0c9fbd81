"""Glue between checkpoints, data, evaluation and export, shared by the CLI and the tests."""

from __future__ import annotations

import json
from pathlib import Path

from training.data import DataSplits
from training.evaluate import manifest_metrics
from training.export import export_model
from training.train import load_dataset_for, model_from_checkpoint


def is_vq_checkpoint(path: Path) -> bool:
    """Whether a checkpoint holds a VQ-VAE (training/train_vq.py) rather than a Gaussian-latent VAE."""
    from training.train import load_checkpoint

    return load_checkpoint(path).get("family") == "vqvae"


def splits_for_checkpoint(ckpt: dict, data: str | None = None) -> DataSplits:
    """The same data and split the checkpoint was trained on; data: where that data is now, if moved."""
    return load_dataset_for(ckpt["train_config"], data, ckpt.get("data_spec"))


def export_checkpoint(checkpoint: Path, models_dir: Path, name: str, version: str, *,
                      report_dir: Path | None = None, calibration_k: int = 256, force: bool = False,
                      background: Path | None = None, anomaly_method: str = "auto", alpha: float = 0.01,
                      parity_tolerance: float = 1.0, selection_per_shift: int = 100,
                      data: str | None = None) -> Path:
    """Export a checkpoint (and optionally a likelihood-ratio background checkpoint) as an artifact.

    data: where the training data is now, when it moved since training (default: where it was)."""
    if is_vq_checkpoint(checkpoint):
        return _export_vq_checkpoint(checkpoint, models_dir, name, version, report_dir=report_dir,
                                     calibration_k=calibration_k, force=force, anomaly_method=anomaly_method,
                                     alpha=alpha, selection_per_shift=selection_per_shift, data=data,
                                     background=background)
    vae, ckpt = model_from_checkpoint(checkpoint)
    bg = None
    if background is not None:
        bg, bg_ckpt = model_from_checkpoint(background)
        split_keys = ("data", "seed", "val_fraction", "calibration_fraction", "subset")
        if any(bg_ckpt["train_config"].get(key) != ckpt["train_config"].get(key) for key in split_keys):
            raise ValueError(f"{background} was trained on another data split than {checkpoint} "
                             f"(compare {', '.join(split_keys)}): its scores would see calibration images")
    run = checkpoint.parent
    report_dir = report_dir or (run / "report")
    metrics = _report_metrics(report_dir)
    training = {
        "data": ckpt["data"], "best_epoch": ckpt["epoch"], "best_validation_score": ckpt["best_score"],
        "config": ckpt["train_config"],
    }
    if bg is not None:
        training["background"] = {"best_epoch": bg_ckpt["epoch"], "config": bg_ckpt["train_config"],
                                  "best_validation_score": bg_ckpt["best_score"]}
    return export_model(vae, splits_for_checkpoint(ckpt, data), models_dir, name, version, metrics=metrics,
                        training=training, report_dir=report_dir if report_dir.is_dir() else None,
                        calibration_k=calibration_k, seed=ckpt["train_config"]["seed"], force=force,
                        background=bg, anomaly_method=anomaly_method, alpha=alpha,
                        parity_tolerance=parity_tolerance, selection_per_shift=selection_per_shift)


def _report_metrics(report_dir: Path) -> dict:
    """The manifest's metrics from an evaluation report folder (none without a report.json)."""
    if not (report_dir / "report.json").exists():
        return {}
    return manifest_metrics(json.loads((report_dir / "report.json").read_text()))


def _export_vq_checkpoint(checkpoint: Path, models_dir: Path, name: str, version: str, *,
                          report_dir: Path | None, calibration_k: int, force: bool, anomaly_method: str,
                          alpha: float, selection_per_shift: int, data: str | None,
                          background: Path | None) -> Path:
    from training.export_vq import export_vq_model
    from training.train_vq import model_from_checkpoint as vq_from_checkpoint

    if background is not None:
        raise ValueError("--background (a likelihood-ratio model) is for Gaussian-latent models only")
    model, ckpt = vq_from_checkpoint(checkpoint)
    report_dir = report_dir or (checkpoint.parent / "report")
    training = {"data": ckpt["data"], "family": "vqvae", "progress": ckpt["progress"],
                "best_validation_log_prior": ckpt["best_score"], "config": ckpt["train_config"]}
    return export_vq_model(model, splits_for_checkpoint(ckpt, data), models_dir, name, version,
                           metrics=_report_metrics(report_dir), training=training,
                           report_dir=report_dir if report_dir.is_dir() else None,
                           calibration_k=calibration_k,
                           seed=ckpt["train_config"]["seed"], force=force, anomaly_method=anomaly_method,
                           alpha=alpha, selection_per_shift=selection_per_shift)
