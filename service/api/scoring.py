"""Log-likelihood estimates and anomaly scores from the engine's log weights: shared by every protocol.

The engine returns log importance weights (N, k); everything here is per-request arithmetic in
float64 (service/estimators.py), so /v1 and /v2 give the same numbers for the same seed.
"""

from typing import Any

import numpy as np

from service.api.errors import InferenceFailed
from service.api.models import ModelRef
from service.artifacts import Manifest
from service.config import Settings
from service.estimators import IWEstimate, iw_estimate, percentile_of, value_at


def likelihood_view(manifest: Manifest, x: np.ndarray) -> np.ndarray:
    """x as the likelihood sees it: binarized at the manifest's threshold when it has one."""
    threshold = manifest.preprocessing.binarize_threshold
    return x if threshold is None else (x >= threshold).astype(np.float32)


async def iw_estimates(ref: ModelRef, x: np.ndarray, y: np.ndarray | None, k: int,
                       seed: int) -> list[IWEstimate]:
    """IW log-likelihood, ELBO and standard error per image; x (N, C, H, W) in [0, 1]."""
    inputs = {"x": likelihood_view(ref.manifest, x)}
    if y is not None:
        inputs["y"] = y
    log_w = (await ref.run("log_weights", inputs, k=k, seed=seed))["log_w"]  # (N, k) float64
    estimates = [iw_estimate(row) for row in log_w]
    if not np.isfinite([e.log_likelihood for e in estimates]).all():
        raise InferenceFailed("the model produced non-finite log-likelihoods")
    return estimates


def anomaly_k(manifest: Manifest, settings: Settings, k: int | None) -> int:
    """The caller's k, else the calibration's, so scores compare with the calibration percentiles."""
    if k is not None:
        return k
    cal = manifest.calibration
    return min(cal.k if cal else settings.default_k, settings.max_k)


def anomaly_results(manifest: Manifest, estimates: list[IWEstimate],
                    percentile: float) -> list[dict[str, Any]]:
    """score = -log p(x), its percentile among calibration scores, the threshold and the flag, per image."""
    cal = manifest.calibration
    threshold = value_at(percentile, cal.percentiles, cal.values) if cal else None
    results = []
    for e in estimates:
        score = -e.log_likelihood
        results.append({
            "score": score, "standard_error": e.standard_error,
            "percentile": percentile_of(score, cal.percentiles, cal.values) if cal else None,
            "threshold": threshold, "is_anomaly": None if threshold is None else bool(score > threshold)})
    return results
