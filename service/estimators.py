"""Importance-weighted likelihood estimates, seeded noise, and anomaly percentiles: pure numpy.

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


def bits_per_dim(log_likelihood: float, dims: int) -> float:
    """Negative log-likelihood in bits per data dimension."""
    return -log_likelihood / (dims * LN2)


def chunk_eps(seed: int, image: int, chunk: int, size: int, latent_dim: int) -> np.ndarray:
    """Standard-normal noise (size, D) for one chunk of one image.

    Seeded by (seed, image index in its request, chunk index) alone, so the numbers do not depend on
    how requests are batched, and the first chunks are shared by every k (k=128 is a prefix of k=256).
    """
    rng = np.random.default_rng([seed, image, chunk])
    return rng.standard_normal((size, latent_dim), dtype=np.float32)


def prior_latents(seed: int, n: int, latent_dim: int, temperature: float) -> np.ndarray:
    """z_i = temperature * eps_i, eps_i ~ N(0, I) seeded by (seed, i): (n, D) float32."""
    z = np.stack([np.random.default_rng([seed, i]).standard_normal(latent_dim) for i in range(n)])
    return (temperature * z).astype(np.float32)


def percentile_of(score: float, percentiles: tuple[float, ...], values: tuple[float, ...]) -> float:
    """Where `score` falls in the calibration distribution, 0-100, linear between calibration points.

    Scores below the smallest calibration value get 0 and above the largest 100. Where several
    percentiles share a value (ties in the calibration set) the highest of them is reported.
    """
    vals = np.asarray(values, dtype=np.float64)
    pcts = np.asarray(percentiles, dtype=np.float64)
    if score <= vals[0]:
        return float(pcts[0])
    if score >= vals[-1]:
        return float(pcts[-1])
    i = int(np.searchsorted(vals, score, side="right"))  # vals[i-1] <= score < vals[i]
    lo, hi = vals[i - 1], vals[i]
    frac = 0.0 if hi == lo else (score - lo) / (hi - lo)
    return float(pcts[i - 1] + frac * (pcts[i] - pcts[i - 1]))


def value_at(percentile: float, percentiles: tuple[float, ...], values: tuple[float, ...]) -> float:
    """The calibration score at `percentile` (linear interpolation): the anomaly threshold."""
    return float(np.interp(percentile, percentiles, values))
