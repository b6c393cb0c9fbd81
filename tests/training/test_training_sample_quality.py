"""Sample quality (FID in a classifier's feature space, class coverage) and the amortization gap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import linalg

from service.artifacts import load_manifest
from training.__main__ import main
from training.amortization import amortization_gap
from training.sample_quality import frechet_distance, sample_quality, train_classifier
from training.train import TrainConfig


def test_frechet_distance_matches_the_matrix_square_root_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ np.diag([1, 2, 1, 1, 0.5, 1]) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # singular covariances (features that are never active) still give a finite, exact answer
    a[:, 0] = b[:, 0] = 0.0
    assert np.isfinite(frechet_distance(a, b))


def test_test_digits_score_better_than_noise_and_cover_every_class(digits8: Any) -> None:
    classifier = train_classifier(digits8, epochs=15)
    assert classifier.test_accuracy > 0.8
    real = sample_quality(digits8.train_images[:300], digits8, classifier)
    noise = sample_quality(torch.rand(300, 1, 8, 8), digits8, classifier)
    assert real["fid"] < noise["fid"]
    assert real["min_class_fraction"] > 0.03 and sum(real["class_fractions"].values()) == pytest.approx(1.0)


def test_amortization_gap_decomposes_the_inference_gap(artifacts: Any) -> None:
    vae = artifacts.vaes["tiny"]
    x = torch.bernoulli(artifacts.test_images[:12], generator=torch.Generator().manual_seed(0))
    gap = amortization_gap(vae, x, k=500, seed=0, max_steps=600)
    assert gap["elbo_q_star"]["mean"] >= gap["elbo_q"]["mean"]  # q* starts at q and keeps its best
    assert gap["amortization_gap"]["mean"] >= 0
    total = gap["amortization_gap"]["mean"] + gap["approximation_gap"]["mean"]
    assert total == pytest.approx(gap["inference_gap"]["mean"], abs=1e-6)
    assert gap["log_px_estimate"]["mean"] >= gap["elbo_q_star"]["mean"] - 0.5  # the IW bound is tighter


def test_evaluate_an_artifact_adds_its_sections_and_keeps_the_manifest_valid(artifacts: Any,
                                                                              tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(artifacts.models_dir / "tiny", models / "tiny")
    version = models / "tiny" / "1"
    # The session's artifacts are exported without a training record; give it the one
    # `python -m training export` writes (the manifest itself is not checksummed).
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["training"] = {"config": TrainConfig(data="digits8").to_dict()}
    (version / "manifest.json").write_text(json.dumps(manifest))
    assert main(["evaluate", str(version), "--amortization-gap", "5", "--k", "50"]) == 0
    report = json.loads((version / "report" / "report.json").read_text())
    assert {"sample_quality", "amortization"} <= set(report)
    assert "## Amortization gap" in (version / "report" / "report.md").read_text()
    load_manifest(version, "onnx")  # every checksum, the report's included, still verifies
    again = ["evaluate", str(version), "--no-sample-quality", "--amortization-gap", "3", "--k", "20"]
    assert main(again) == 0
    assert (version / "report" / "report.md").read_text().count("## Amortization gap") == 1  # replaced


def test_attach_report_replaces_the_report_and_its_checksums(artifacts: Any, tmp_path: Path) -> None:
    shutil.copytree(artifacts.models_dir / "tiny", tmp_path / "models" / "tiny")
    version = tmp_path / "models" / "tiny" / "1"
    report = tmp_path / "report"
    (report / "ood").mkdir(parents=True)
    (report / "report.json").write_text(json.dumps({"test_nll": 12.5, "kl_per_dim": [0.1, 0.2]}))
    (report / "report.md").write_text("# report\n")
    (report / "ood" / "ood.md").write_text("| shift | auroc |\n")
    assert main(["attach-report", str(version), str(report)]) == 0
    manifest = load_manifest(version, "onnx")  # every file verifies, the new report's included
    assert manifest.raw["metrics"] == {"test_nll": 12.5, "kl_per_dim": [0.1, 0.2]}
    assert "report/ood/ood.md" in manifest.raw["files"]
    assert main(["attach-report", str(version), str(tmp_path / "nowhere")]) == 2
