"""Typed results of the client: frozen dataclasses holding numpy arrays, one row per input item.

Every model-level result carries `model` and `version` (which artifact answered) and `request_id`
(the X-Request-ID of the call, to find it in the server logs). Array results compare by identity
(`eq=False`): `==` on numpy arrays is element-wise, so compare fields with numpy instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vae_client._images import to_pil


@dataclass(frozen=True)
class Health:
    """GET /healthz: `status` "ok" while the process lives; /readyz adds the loaded `models`."""

    status: str
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """One loaded model as listed by GET /v1/models."""

    name: str
    version: str
    kind: str  # vae, cvae, linear or vqvae
    latent_dim: int
    input_shape: tuple[int, int, int]  # (channels, height, width) the model expects
    likelihood: dict[str, Any]
    labels: tuple[str, ...] | None  # class names of a conditional model
    family: str = "gaussian"  # gaussian (latent vectors) or vqvae (grids of codebook indices)
    # what decode takes and sample returns: input ("latents" | "codes"), shape, dtype[, codebook_size]
    latent: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDetail(ModelInfo):
    """GET /v1/models/{name}: metadata, metrics, runtime and the service's limits for this model."""

    created_at: str | None = None
    architecture: str | None = None
    runtime: str = ""
    device: str = ""
    limits: dict[str, Any] = field(default_factory=dict)  # default_k, max_k, max_n, max_images, ...
    batching: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the whole JSON answer, for fields added later


@dataclass(frozen=True, eq=False)
class _Result:
    model: str
    version: str
    request_id: str | None


@dataclass(frozen=True, eq=False)
class EncodeResult(_Result):
    """The posterior of each image. Gaussian-latent models: q(z|x) = N(mean, diag variance), arrays
    (N, latent_dim) float64. VQ-VAEs: `codes` (N, h, w) int64 codebook indices, and `pre_quantization`
    (N, D, h, w) float64 when asked for with include="pre_quantization". The other fields are None."""

    mean: np.ndarray | None = None
    variance: np.ndarray | None = None
    log_variance: np.ndarray | None = None
    codes: np.ndarray | None = None
    pre_quantization: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.mean if self.mean is not None else self.codes)


@dataclass(frozen=True, eq=False)
class _ImagesResult(_Result):
    images: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    png: tuple[bytes, ...] | None  # the PNG files as sent, when requested with format="png"

    def __len__(self) -> int:
        return len(self.images)

    def to_pil(self) -> list[Image.Image]:
        """The images as PIL images (8 bits per channel; grey models give mode L)."""
        return to_pil(self.images)


@dataclass(frozen=True, eq=False)
class DecodeResult(_ImagesResult):
    """E[x|z] per latent vector."""


@dataclass(frozen=True, eq=False)
class SampleResult(_ImagesResult):
    """Samples from the prior, decoded to `images`: `latents` (N, latent_dim) z = temperature * eps, or for
    a VQ-VAE the (N, h, w) int64 code grids drawn from its PixelCNN prior."""

    seed: int
    temperature: float
    latents: np.ndarray
    labels: tuple[str | None, ...]  # the class of each sample of a conditional model, else None


@dataclass(frozen=True, eq=False)
class ReconstructResult(_ImagesResult):
    """Decoded posterior means, with the squared error against the (preprocessed) input, shape (N,)."""

    mse: np.ndarray
    sse: np.ndarray


@dataclass(frozen=True, eq=False)
class LogLikelihoodResult(_Result):
    """Importance-weighted log p(x) in nats with `k` samples; arrays (N,) float64.

    `standard_error` is nan where the service gives none (k = 1). Pass `seed` back for the same numbers.
    """

    k: int
    seed: int
    binarized: bool
    log_likelihood: np.ndarray
    elbo: np.ndarray
    bits_per_dim: np.ndarray
    standard_error: np.ndarray

    def __len__(self) -> int:
        return len(self.log_likelihood)


@dataclass(frozen=True, eq=False)
class AnomalyResult(_Result):
    """Anomaly scores per image (N,) of one method, with conformal p-values.

    `method` names the score, `alpha` the level, `p_value` the conformal p-value against the model's
    calibration scores, `percentile` the share of calibration scores below the score, and
    is_anomaly = p_value <= alpha (equivalently score > threshold). `standard_error` is the score's
    (the -log p(x) estimate's) for the methods whose score is -log p(x) plus a term the samples do not
    change (nll, complexity), else nan.
    """

    k: int
    seed: int
    calibration_k: int
    method: str
    alpha: float
    threshold: float | None  # is_anomaly <=> score > threshold (None: nothing can be flagged at alpha)
    score: np.ndarray
    p_value: np.ndarray  # (N,)
    percentile: np.ndarray
    is_anomaly: np.ndarray  # bool (N,)
    standard_error: np.ndarray

    def __len__(self) -> int:
        return len(self.score)
