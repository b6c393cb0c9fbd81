"""Importance-weighted likelihood estimates: pure numpy.

log p(x) >= log (1/K) sum_k w_k with w_k = p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (the IWAE bound,
Burda et al. 2016); it tightens as K grows. The ELBO is the K = 1 bound averaged: mean_k log w_k.
All reductions are in float64: log_w are sums of ~C*H*W float32 terms, and K can be 5000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class IWEstimate:
    log_likelihood: float  # nats, IW bound with k samples
    elbo: float  # nats, mean of the log weights
    standard_error: float | None  # delta-method SE of log_likelihood; None for k = 1
    k: int


def logsumexp(a: np.ndarray) -> float:
    """Exact log(sum(exp(a))) of a 1-D array, in float64."""
    a = np.asarray(a, dtype=np.float64)
    top = float(a.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(a - top).sum()))


def iw_estimate(log_w: np.ndarray) -> IWEstimate:
    """log_w: (K,) log importance weights of one input -> IW log-likelihood, ELBO and standard error.

    SE by the delta method: with w = exp(log_w - max), Var[log mean w] ~= Var[w] / (K mean(w)^2).
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    k = int(log_w.shape[0])
    assert log_w.ndim == 1 and k >= 1, f"expected (K,) log weights, got shape {log_w.shape}"
    w = np.exp(log_w - log_w.max())
    se = float(w.std(ddof=1) / (math.sqrt(k) * w.mean())) if k > 1 else None
    return IWEstimate(logsumexp(log_w) - math.log(k), float(log_w.mean()), se, k)


def iw_estimates(log_w: np.ndarray) -> dict[str, np.ndarray]:
    """log_w (N, K) -> log_likelihood, elbo, standard_error (N,) float64: iw_estimate of each row at once.

    standard_error is NaN for K = 1 (undefined).
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    assert log_w.ndim == 2 and log_w.shape[1] >= 1, f"expected (N, K) log weights, got shape {log_w.shape}"
    k = log_w.shape[1]
    top = log_w.max(axis=1, keepdims=True)  # (N, 1)
    finite = np.isfinite(top)
    w = np.exp(log_w - np.where(finite, top, 0.0))  # (N, K), max 1 per finite row
    mean_w = w.mean(axis=1)
    log_likelihood = np.where(finite[:, 0], top[:, 0] + np.log(mean_w), top[:, 0])
    se = w.std(axis=1, ddof=1) / (math.sqrt(k) * mean_w) if k > 1 else np.full(len(log_w), np.nan)
    return {"log_likelihood": log_likelihood, "elbo": log_w.mean(axis=1), "standard_error": se}


def bits_per_dim(log_likelihood: float, dims: int) -> float:
    """Negative log-likelihood in bits per data dimension."""
    return -log_likelihood / (dims * LN2)
