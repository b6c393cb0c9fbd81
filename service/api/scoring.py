"""Log-likelihood estimates and anomaly scores from the engine's log weights: shared by every protocol.

The engine returns log importance weights (N, k); everything here is per-request arithmetic in
float64 (service/estimators.py), so /v1 and /v2 give the same numbers for the same seed.
"""

import asyncio
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service import anomaly
from service.api.errors import InferenceFailed, InvalidInput
from service.api.models import ModelRef
from service.artifacts import Manifest
from service.config import Settings
from service.engine.interface import Operation
from service.estimators import IWEstimate, iw_estimate, percentile_of, value_at


async def iw_estimates(ref: ModelRef, x: np.ndarray, y: np.ndarray | None, k: int, seed: int,
                       operation: Operation = "log_weights") -> list[IWEstimate]:
    """IW log-likelihood, ELBO and standard error per image; x (N, C, H, W) in [0, 1]."""
    inputs = {"x": ref.manifest.preprocessing.likelihood_view(x)}
    if y is not None:
        inputs["y"] = y
    log_w = (await ref.run(operation, inputs, k=k, seed=seed))["log_w"]  # (N, k) float64
    estimates = [iw_estimate(row) for row in log_w]
    if not np.isfinite([e.log_likelihood for e in estimates]).all():
        raise InferenceFailed("the model produced non-finite log-likelihoods")
    return estimates


@dataclass(frozen=True)
class AnomalyPlan:
    """What an anomaly request asks for, checked against the model's calibration."""

    method: str
    alpha: float | None  # None: the percentile threshold of a model without per-method calibration
    k: int


def anomaly_plan(manifest: Manifest, settings: Settings, method: str | None, alpha: float | None,
                 k: int | None) -> AnomalyPlan:
    """The method, level and k to use (the caller's, else the settings', else the manifest's), or 422."""
    cal = manifest.anomaly
    if cal is None:  # mnist-vae/1 and older artifacts: -log p(x) against a percentile calibration
        if method not in (None, "nll"):
            raise InvalidInput(f"model {manifest.name} version {manifest.version} has no calibration for "
                               f"method {method!r}; it offers ['nll']")
        legacy = manifest.calibration
        return AnomalyPlan("nll", None, k or min(legacy.k if legacy else settings.default_k, settings.max_k))
    if method is None:
        method = settings.anomaly_method if settings.anomaly_method in cal.methods else cal.default_method
    if method not in cal.methods:
        raise InvalidInput(f"model {manifest.name} version {manifest.version} has no calibration for method "
                           f"{method!r}; it offers {sorted(cal.methods)}")
    level = alpha if alpha is not None else settings.anomaly_alpha if settings.anomaly_alpha else cal.alpha
    return AnomalyPlan(method, level, k or min(cal.k, settings.max_k))


async def run_rows(ref: ModelRef, operation: Operation, name: str, rows: np.ndarray,
                   output: str) -> np.ndarray:
    """One output of `operation` over (R, ...) rows, in engine calls of at most VAE_MAX_IMAGES rows.

    A fisher request encodes and decodes each image 1 + T times; calls of at most VAE_MAX_IMAGES rows,
    one after the other, each fit an empty queue (max_images <= max_queue_size), so no request is
    refused as too big for the queue it would have alone. One image (6 rows) is one call.
    """
    max_rows = ref.state.settings.max_images
    parts = [(await ref.run(operation, {name: rows[i:i + max_rows]}))[output]
             for i in range(0, len(rows), max_rows)]
    return np.concatenate(parts)


async def encode_rows(ref: ModelRef, images: np.ndarray) -> np.ndarray:
    """Encoder means of (R, C, H, W) images -> (R, D) float32 (see run_rows)."""
    return await run_rows(ref, "encode", "x", images, "mean")


async def orientation_inputs(ref: ModelRef, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fisher's model outputs for the likelihood view (N, C, H, W): the encoder means (N, D) and the
    reconstruction errors (1 + T, N) of the view and its geometric transforms (anomaly.orientation_gain)."""
    rows = anomaly.orientation_views(view)  # ((1 + T) N, C, H, W)
    means = await encode_rows(ref, rows)  # ((1 + T) N, D)
    reconstructions = await run_rows(ref, "decode", "z", means, "x_mean")  # ((1 + T) N, C, H, W)
    errors = anomaly.reconstruction_error(rows, reconstructions, ref.manifest.likelihood)
    return means[:len(view)], errors.reshape(-1, len(view))


async def method_inputs(ref: ModelRef, x: np.ndarray, y: np.ndarray | None, view: np.ndarray,
                        plan: AnomalyPlan, seed: int) -> dict[str, np.ndarray]:
    """What the plan's method needs from the model besides -log p(x): score_and_test's keywords.

    x: (N, C, H, W) the input; view: its likelihood view. The likelihood ratio runs the background graph
    on the very same samples as -log p(x) (same seed).
    """
    if plan.alpha is None:  # uncalibrated models score -log p(x) alone
        return {}
    if plan.method == "likelihood_ratio":
        background = await iw_estimates(ref, x, y, plan.k, seed, operation="background_log_weights")
        return {"background_nll": -np.array([e.log_likelihood for e in background])}  # (N,)
    if plan.method == "latent_knn":
        # The bank holds encoder means of the training images' likelihood view; encode the same view.
        return {"latent_mean": await encode_rows(ref, view)}  # (N, D)
    if plan.method == "fisher":
        latent_mean, errors = await orientation_inputs(ref, view)  # (N, D), (1 + T, N)
        return {"latent_mean": latent_mean, "reconstruction_errors": errors}
    return {}


A = TypeVar("A")
B = TypeVar("B")


async def _gather_or_cancel(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both results, run concurrently; the first failure cancels the other, so a refused or failed
    half does not leave the other half's rows queued for nobody."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        a, b = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return a, b


async def anomaly_results(ref: ModelRef, x: np.ndarray, y: np.ndarray | None, plan: AnomalyPlan, seed: int,
                          percentile: float) -> list[dict[str, Any]]:
    """One result per image: the method's score, its p-value, its percentile among the calibration
    scores, the threshold at alpha and the decision.

    -log p(x) comes from the same seeded estimate as /log-likelihood. Models without per-method
    calibration keep the percentile threshold of -log p(x).
    """
    m = ref.manifest
    view = m.preprocessing.likelihood_view(x)  # (N, C, H, W), what log_weights scores
    # The method's own model work runs beside the log-weights, not after them: its rows queue on other
    # batchers and run between log-weights slices, so its round trips to the inference process do not
    # add to the latency (one after the other, fisher's encode and decode took its median at low load
    # from nll's 107 ms to 124 ms).
    estimates, inputs = await _gather_or_cancel(iw_estimates(ref, x, y, plan.k, seed),
                                                method_inputs(ref, x, y, view, plan, seed))
    nll = np.array([-e.log_likelihood for e in estimates])  # (N,)
    legacy = m.calibration
    if plan.alpha is None:
        pcts = [percentile_of(s, legacy.percentiles, legacy.values) if legacy else None for s in nll]
        threshold = value_at(percentile, legacy.percentiles, legacy.values) if legacy else None
        return [{"method": "nll", "score": float(s), "p_value": None, "alpha": None, "percentile": pct,
                 "threshold": threshold, "is_anomaly": None if threshold is None else bool(s > threshold),
                 "standard_error": e.standard_error} for s, pct, e in zip(nll, pcts, estimates, strict=True)]
    assert m.anomaly is not None
    try:
        tested = anomaly.score_and_test(plan.method, m.anomaly.methods[plan.method], plan.alpha, nll,
                                        images=view, raw_images=x, **inputs)
    except anomaly.AnomalyError as exc:
        raise InferenceFailed(f"anomaly scoring failed: {exc}") from exc
    return [{"method": t.method, "score": t.score, "p_value": t.p_value, "alpha": t.alpha,
             "percentile": t.percentile, "threshold": t.threshold if math.isfinite(t.threshold) else None,
             "is_anomaly": t.is_anomaly, "standard_error": e.standard_error}
            for t, e in zip(tested, estimates, strict=True)]
