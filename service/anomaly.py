"""Anomaly scores for VAEs beyond -log p(x), and conformal p-values that calibrate their false alarms.

Pure numpy (plus zlib from the standard library): the service and the training code both import it,
so a score computed at export time (calibration) and at request time (serving) is the same function.

Scores (higher = more anomalous), all in nats, from per-image quantities the service already has:

* ``nll``: -log p(x), the importance-weighted bound (Burda et al. 2016). Known failure: deep generative
  models give *higher* likelihood to simpler inputs than to their training data (Nalisnick et al.
  2019, "Do deep generative models know what they don't know?"; blank images, simple shapes).
* ``typicality``: two-sided distance of -log p(x) from what normal data gives (Nalisnick, Matsukawa,
  Teh & Lakshminarayanan 2019, "Detecting out-of-distribution inputs to deep generative models using
  typicality"). Their test uses |NLL - H| with H the entropy estimated on held-out data, for a batch
  of M inputs; the service scores single inputs (M = 1). Because the NLL of normal data is skewed
  (long right tail), the two sides are scaled separately: (NLL - c) / s_hi above the centre c and
  (c - NLL) / s_lo below it, so "too likely" is judged against the spread of the lower tail. With
  c = mean and s_lo = s_hi = 1 it is exactly Nalisnick et al.'s |NLL - H|.
* ``complexity``: -log p(x) minus the input's complexity L(x) measured by a lossless compressor, both
  in nats (Serra et al. 2020, "Input complexity and out-of-distribution detection with
  likelihood-based generative models", S(x) = -l_M(x) - L(x) in bits). Simple inputs compress well,
  so their small L(x) no longer makes them look normal. L(x) here: 8 ln 2 nats per byte of the
  zlib (DEFLATE, PNG's compressor) level-9 stream of the 8-bit image the model scores.
* ``likelihood_ratio``: -log p(x) + log p_bg(x) = NLL(x) - NLL_bg(x) (Ren et al. 2019, "Likelihood
  ratios for out-of-distribution detection"): p_bg is a background model trained on perturbed inputs
  (pixels replaced by noise), which captures the population-level statistics (e.g. the amount of
  background) that dominate log p(x); the ratio keeps the semantic part.
* ``combined``: max(typicality(x), (S(x) - c_S) / s_S) with S the complexity score and c_S, s_S its
  median and median-to-99%-quantile distance on validation data: flags inputs that are either
  atypically likely/unlikely (Nalisnick et al.) or too likely for their complexity (Serra et al.).
  It is one more score, calibrated conformally like the others, so the false-alarm guarantee holds.
* ``latent_knn``: Euclidean distance from the encoder mean mu(x) to its nearest neighbour among the
  encoder means of the training images (Sun, Ming, Zhu & Li 2022, "Out-of-distribution detection
  with deep nearest neighbors", on the VAE's latent space). It looks at *where* q(z|x) puts an input
  rather than how likely the input is, so it does not share the likelihood's blind spot for simple
  inputs, and it sees mirrored or rotated digits that land between the classes.
* ``fisher``: Fisher's combination of several test statistics (Fisher 1925; as a combined test for
  OOD detection with generative models: Bergamin et al. 2022, "Model-agnostic out-of-distribution
  detection using combined statistical tests", AISTATS). Each statistic T_j in FISHER_STATISTICS gets
  an empirical tail p-value p_j against its values on the validation digits (upper tail, or both
  tails), and the score is -2 sum_j log p_j. The statistics see different things: the complexity
  score (too likely for its compressed length), the latent nearest-neighbour distances (an unusual
  code), the compressed length of the grey input itself (too simple or too complex, e.g. blurry
  upscaled images or thin pen strokes) and the orientation gain (below). The statistics are not
  independent, so -2 sum log p_j does not follow Fisher's chi-square law; it does not need to: it is
  calibrated conformally like every other score, which is what makes its false alarms <= alpha.
* the orientation gain, one of fisher's statistics: R(x) - min_T R(T x), with R the reconstruction
  error -log p(x | z = mu(x)) at the encoder mean (reconstruction_error) and T each of
  GEOMETRIC_TRANSFORMS (mirror images, quarter and half turns): how much better the model explains
  the input once it is turned or mirrored back. A normal digit is explained worse when turned
  (gain < 0); a mirrored or rotated one better (gain > 0). A transform only moves pixels, so x and
  T x have the same ink and the same compressed length: the comparison is free of the complexity
  bias that misleads -log p(x) itself, and it sees the fine cues (the slant of an upside-down 0 or 1)
  that the latent distances blur. It is the training-free form of detecting anomalies by whether a
  model recognizes the transformation applied to an input (Golan & El-Yaniv 2018, "Deep anomaly
  detection using geometric transformations"; Hendrycks et al. 2019, "Using self-supervised learning
  can improve model robustness and uncertainty"). It costs 1 + T encodes and decodes per image, small
  next to the k decoder passes of -log p(x).

Calibration (conformal prediction; Vovk, Gammerman & Shafer 2005; Bates et al. 2023, "Testing for
outliers with conformal p-values"): with scores s_1..s_n of a calibration split of normal data held
out of training and model selection, a new input with score s gets

    p = (1 + #{i : s_i >= s}) / (n + 1),

and is_anomaly = p <= alpha. When the new input is exchangeable with the calibration inputs (normal
data), P(p <= alpha) = floor(alpha (n + 1)) / (n + 1) <= alpha: at most alpha false alarms by
construction, whatever the score function, as long as the score does not depend on the calibration
split (reference statistics such as typicality's centre come from the validation split instead).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

METHODS = ("nll", "typicality", "complexity", "likelihood_ratio", "combined", "latent_knn", "fisher")
LATENT_METHODS = frozenset({"latent_knn", "fisher"})  # need the encoder means and the latent bank
# Methods whose score is -log p(x) plus a term the importance samples do not change (nll: nothing;
# complexity: -L(x), the input's compressed length): the delta-method standard error of the -log p(x)
# estimate is then exactly the standard error of the score. The other scores get none, as it would not
# be theirs: typicality folds at its centre and scales each side apart, combined takes a maximum,
# likelihood_ratio subtracts a second estimate with its own error, latent_knn and fisher are not (only)
# functions of -log p(x).
STANDARD_ERROR_METHODS = frozenset({"nll", "complexity"})
PAPERS = {
    "nll": "Burda, Grosse & Salakhutdinov 2016 (IW bound); Nalisnick et al. 2019 (its failure mode)",
    "typicality": "Nalisnick, Matsukawa, Teh & Lakshminarayanan 2019, arXiv:1906.02994",
    "complexity": "Serra et al. 2020, ICLR, arXiv:1909.11480",
    "likelihood_ratio": "Ren et al. 2019, NeurIPS, arXiv:1906.02845",
    "combined": "max of typicality (Nalisnick et al. 2019) and standardized complexity (Serra et al. 2020)",
    "latent_knn": "Sun, Ming, Zhu & Li 2022, ICML, arXiv:2204.06507 (on the encoder means)",
    "fisher": "Fisher 1925; Bergamin et al. 2022, AISTATS, arXiv:2203.01097 (combined statistical tests); "
              "orientation gain after Golan & El-Yaniv 2018, NeurIPS, arXiv:1805.10917",
}
# fisher's statistics and which tail of each is anomalous; their validation values are the reference.
FISHER_STATISTICS: dict[str, str] = {
    "complexity": "upper",  # -log p(x) - L(view): too likely for its complexity
    "latent_knn": "upper",  # Euclidean distance of mu(x) to the nearest training code
    "latent_knn_cosine": "upper",  # cosine distance of mu(x) to its 5th nearest training code
    "input_complexity": "two_sided",  # L(x) of the grey input (before binarization)
    # R(x) - min_T R(T x), R the reconstruction error at the encoder mean: better explained turned back
    "orientation_gain": "upper",
}
# The orientation gain's transforms of an (N, C, H, W) batch; quarter turns need square images.
GEOMETRIC_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hflip": lambda x: x[..., :, ::-1],
    "vflip": lambda x: x[..., ::-1, :],
    "rot90": lambda x: np.rot90(x, 1, axes=(-2, -1)),
    "rot180": lambda x: np.rot90(x, 2, axes=(-2, -1)),
    "rot270": lambda x: np.rot90(x, 3, axes=(-2, -1)),
}
QUARTER_TURNS = frozenset({"rot90", "rot270"})
KNN_K = 1  # latent_knn: the nearest neighbour (Sun et al.'s k is larger for their bigger banks)
KNN_COSINE_K = 5
# Bernoulli reconstruction errors clip the decoder's probabilities to [p, 1 - p]: a float32 sigmoid can
# round to exactly 0 or 1, and one such pixel must cost a bounded ln(1 / p) = 13.8 nats, not infinity.
BERNOULLI_CLIP = 1e-6
NATS_PER_BYTE = 8.0 * math.log(2.0)
ZLIB_LEVEL = 9
_EPS = 1e-9  # alpha (n + 1) is compared with integers; guards 0.05 * 20 = 1.0000000000000002


class AnomalyError(ValueError):
    """A score cannot be computed: unknown method, missing input or calibration."""


# -- per-image quantities ------------------------------------------------------------------------------
def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> uint8 0..255 (round half to even, clipped). Same shape."""
    x = np.asarray(images, dtype=np.float64)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def complexity_nats(images: np.ndarray, level: int = ZLIB_LEVEL) -> np.ndarray:
    """Serra et al. 2020's input complexity L(x) in nats: (N, C, H, W) in [0, 1] -> (N,) float64.

    Each image is quantized to 8 bits and its C*H*W bytes (C-order) compressed with zlib (DEFLATE, the
    compressor inside PNG) at `level`; L(x) = 8 ln 2 * (compressed length in bytes). The constant zlib
    header/checksum (6 bytes) is included: it shifts every score equally and cancels in p-values.
    """
    x = to_uint8(images)
    if x.ndim != 4:
        raise AnomalyError(f"expected images of shape (N, C, H, W), got {x.shape}")
    lengths = [len(zlib.compress(np.ascontiguousarray(img).tobytes(), level)) for img in x]
    return np.asarray(lengths, dtype=np.float64) * NATS_PER_BYTE


class LatentBank:
    """The (M, D) encoder means of the training images, with what knn_distance derives from them made once.

    Deriving them per call (a float64 copy, squared norms, unit rows) took 3.2 ms of each fisher request
    for the 3,600 x 32 bank of mnist-vae/1 against 0.07 ms for the distances themselves; the results are
    the same bits either way (the same operations on the same values).
    """

    def __init__(self, vectors: np.ndarray) -> None:
        stored = np.asarray(vectors)
        if stored.ndim != 2:
            raise AnomalyError(f"a latent bank must be (M, D), got {stored.shape}")
        self.vectors = stored  # as the artifact stores it (float32)
        self.rows = stored.astype(np.float64)  # (M, D)

    # Derived on first use: a one-off call (training's shift AUROC on pixel banks) needs only one metric.
    @functools.cached_property
    def squared_norms(self) -> np.ndarray:
        return (self.rows * self.rows).sum(1)  # (M,)

    @functools.cached_property
    def unit_rows(self) -> np.ndarray:
        return self.rows / np.maximum(np.linalg.norm(self.rows, axis=1, keepdims=True), 1e-12)  # (M, D)

    @property
    def shape(self) -> tuple[int, int]:
        return self.vectors.shape  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.vectors)


def knn_distance(points: np.ndarray, bank: np.ndarray | LatentBank, k: int = 1,
                 metric: str = "euclidean") -> np.ndarray:
    """Distance of each point to its k-th nearest bank point: (N, D), (M, D) -> (N,) float64.

    metric: "euclidean", or "cosine" (1 - cosine similarity; a zero vector is at distance 1 from all).
    A bank scored repeatedly (the served calibration's) is passed as a LatentBank, prepared once.
    """
    x = np.asarray(points, dtype=np.float64)
    b = bank if isinstance(bank, LatentBank) else LatentBank(bank)
    if x.ndim != 2 or x.shape[1] != b.shape[1]:
        raise AnomalyError(f"latent means {x.shape} and bank {b.shape} must be (N, D) and (M, D)")
    if not 1 <= k <= len(b):
        raise AnomalyError(f"k = {k} needs at least k bank points, the bank has {len(b)}")
    if metric == "euclidean":
        d = (x * x).sum(1)[:, None] + b.squared_norms[None, :] - 2.0 * x @ b.rows.T  # (N, M) squared
        d = np.sqrt(np.maximum(d, 0.0))
    elif metric == "cosine":
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        d = 1.0 - xn @ b.unit_rows.T
    else:
        raise AnomalyError(f"unknown metric {metric!r} (euclidean or cosine)")
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def tail_p_values(values: np.ndarray, reference: np.ndarray, tail: str) -> np.ndarray:
    """Empirical tail p-value of each value against a reference sample: (N,), (n,) -> (N,) in (0, 1].

    upper: (1 + #{ref >= v}) / (n + 1); two_sided: min(1, 2 min(upper, lower)), with lower the same
    count of ref <= v. NaN counts as the most extreme value.
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    v = np.asarray(values, dtype=np.float64)
    n = len(ref)
    upper = (1.0 + n - np.searchsorted(ref, v, side="left")) / (n + 1.0)
    upper = np.where(np.isnan(v), 1.0 / (n + 1.0), upper)
    if tail == "upper":
        return upper
    if tail != "two_sided":
        raise AnomalyError(f"unknown tail {tail!r} (upper or two_sided)")
    lower = (1.0 + np.searchsorted(ref, v, side="right")) / (n + 1.0)
    lower = np.where(np.isnan(v), 1.0 / (n + 1.0), lower)
    return np.minimum(1.0, 2.0 * np.minimum(upper, lower))


def transform_names(height: int, width: int) -> tuple[str, ...]:
    """The GEOMETRIC_TRANSFORMS that keep an H x W image's shape (quarter turns only when square)."""
    return tuple(name for name in GEOMETRIC_TRANSFORMS if height == width or name not in QUARTER_TURNS)


def geometric_transforms(images: np.ndarray) -> np.ndarray:
    """Every shape-keeping transform of a batch: (N, C, H, W) -> (T, N, C, H, W), T = len(transform_names)."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise AnomalyError(f"expected images of shape (N, C, H, W), got {x.shape}")
    return np.stack([np.ascontiguousarray(GEOMETRIC_TRANSFORMS[name](x))
                     for name in transform_names(*x.shape[-2:])])


def orientation_views(images: np.ndarray) -> np.ndarray:
    """The image and its geometric transforms, rows stacked: (N, C, H, W) -> ((1 + T) N, C, H, W).

    Rows 0..N-1 are the images, then N rows per transform in transform_names order: what the orientation
    gain encodes and decodes (reconstruction_errors of these rows, reshaped to (1 + T, N)).
    """
    x = np.asarray(images)
    return np.concatenate([x[None], geometric_transforms(x)]).reshape(-1, *x.shape[1:])


def reconstruction_error(images: np.ndarray, reconstructions: np.ndarray, likelihood: str) -> np.ndarray:
    """-log p(x | z = mu(x)) in nats, up to a constant: (N, C, H, W), (N, C, H, W) -> (N,) float64.

    images: the model's view x (binary for Bernoulli models); reconstructions: the decoder's mean
    E[x | z] at the encoder mean. Bernoulli: the cross-entropy, probabilities clipped to BERNOULLI_CLIP.
    Gaussian: half the squared error, which is -log p(x | z) times the decoder variance plus a constant:
    the same order for a fixed or global variance (a per-pixel variance would weight pixels apart).
    """
    x = np.asarray(images, dtype=np.float64)
    mean = np.asarray(reconstructions, dtype=np.float64)
    if x.shape != mean.shape or x.ndim != 4:
        raise AnomalyError(f"images {x.shape} and reconstructions {mean.shape} must both be (N, C, H, W)")
    if likelihood == "bernoulli":
        p = np.clip(mean, BERNOULLI_CLIP, 1.0 - BERNOULLI_CLIP)
        per_pixel = -(x * np.log(p) + (1.0 - x) * np.log1p(-p))
    elif likelihood == "gaussian":
        per_pixel = 0.5 * (x - mean) ** 2
    else:
        raise AnomalyError(f"no reconstruction error for likelihood {likelihood!r} (bernoulli, gaussian)")
    return per_pixel.reshape(len(x), -1).sum(axis=1)


def orientation_gain(reconstruction_errors: np.ndarray) -> np.ndarray:
    """R(x) - min_T R(T x): (1 + T, N) errors of the images (row 0) and their transforms -> (N,) float64."""
    errors = np.asarray(reconstruction_errors, dtype=np.float64)
    if errors.ndim != 2 or len(errors) < 2:
        raise AnomalyError(f"reconstruction errors {errors.shape} must be (1 + T, N) with T >= 1")
    return errors[0] - errors[1:].min(axis=0)


def fisher_statistics(nll: np.ndarray, images: np.ndarray, raw_images: np.ndarray, latent_mean: np.ndarray,
                      reconstruction_errors: np.ndarray,
                      latent_bank: np.ndarray | LatentBank) -> dict[str, np.ndarray]:
    """The statistics of FISHER_STATISTICS, each (N,): the inputs of `fisher` and of its reference.

    latent_mean: (N, D) encoder means of `images`; reconstruction_errors: (1 + T, N) of
    orientation_views(images), reshaped (row 0: the images, row t: transform t).
    """
    errors = np.asarray(reconstruction_errors)
    if errors.ndim != 2 or errors.shape[1] != len(latent_mean):
        raise AnomalyError(f"reconstruction errors {errors.shape} must be (1 + T, N), N = {len(latent_mean)}")
    return {
        "complexity": np.asarray(nll, dtype=np.float64) - complexity_nats(images),
        "latent_knn": knn_distance(latent_mean, latent_bank, KNN_K),
        "latent_knn_cosine": knn_distance(latent_mean, latent_bank, KNN_COSINE_K, "cosine"),
        "input_complexity": complexity_nats(raw_images),
        "orientation_gain": orientation_gain(errors),
    }


def fisher_score(statistics: dict[str, np.ndarray], reference: dict[str, Sequence[float]]) -> np.ndarray:
    """-2 sum_j log p_j over FISHER_STATISTICS (Fisher's combination): (N,) float64, >= 0."""
    total = None
    for name, tail in FISHER_STATISTICS.items():
        if name not in statistics or name not in reference:
            raise AnomalyError(f"fisher needs statistic {name!r} and its reference")
        term = -2.0 * np.log(tail_p_values(statistics[name], np.asarray(reference[name]), tail))
        total = term if total is None else total + term
    assert total is not None
    return total


# -- scores --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypicalityReference:
    """Centre and one-sided scales of normal data's -log p(x) (from the validation split)."""

    center: float
    scale_low: float = 1.0
    scale_high: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and self.scale_low > 0 and self.scale_high > 0):
            raise AnomalyError(f"bad typicality reference {self}")

    @classmethod
    def fit(cls, nll: np.ndarray, tail: float = 0.01) -> TypicalityReference:
        """Median as the centre; distances from it to the `tail` and 1 - `tail` quantiles as scales.

        nll: (M,) -log p(x) of normal held-out data (never the calibration split).
        """
        v = np.asarray(nll, dtype=np.float64)
        lo, med, hi = np.quantile(v, [tail, 0.5, 1.0 - tail])
        tiny = 1e-6 * max(1.0, abs(float(med)))
        return cls(float(med), max(float(med - lo), tiny), max(float(hi - med), tiny))

    def to_dict(self) -> dict[str, float]:
        return {"center": self.center, "scale_low": self.scale_low, "scale_high": self.scale_high}


def typicality_score(nll: np.ndarray, ref: TypicalityReference) -> np.ndarray:
    """Two-sided scaled distance of -log p(x) from the typical value: (N,) -> (N,), >= 0."""
    v = np.asarray(nll, dtype=np.float64)
    return np.where(v >= ref.center, (v - ref.center) / ref.scale_high, (ref.center - v) / ref.scale_low)


def anomaly_scores(method: str, nll: np.ndarray, *, images: np.ndarray | None = None,
                   background_nll: np.ndarray | None = None,
                   typicality: TypicalityReference | None = None,
                   complexity_reference: TypicalityReference | None = None,
                   raw_images: np.ndarray | None = None, latent_mean: np.ndarray | None = None,
                   reconstruction_errors: np.ndarray | None = None,
                   latent_bank: np.ndarray | LatentBank | None = None,
                   fisher_reference: dict[str, Sequence[float]] | None = None) -> np.ndarray:
    """Scores of one method, (N,) float64; higher = more anomalous.

    nll: (N,) -log p(x) in nats (IW bound) of the images as the model scores them; images: (N, C, H, W)
    in [0, 1], the model's view (binarized for Bernoulli models), needed by `complexity`;
    background_nll: (N,) -log p_bg(x) of the background model, needed by `likelihood_ratio`;
    typicality: the reference of `typicality` (and `combined`); complexity_reference: centre and upper
    scale of the complexity score on validation data (`combined`); raw_images: (N, C, H, W) the input
    before binarization (`fisher`); latent_mean: (N, D) encoder means of `images`;
    reconstruction_errors: (1 + T, N) reconstruction errors of the images (row 0) and of each geometric
    transform (`fisher`, see orientation_views); latent_bank: (M, D) encoder means of the training
    images (`latent_knn`, `fisher`);
    fisher_reference: the validation values of each FISHER_STATISTICS statistic.
    """
    v = np.asarray(nll, dtype=np.float64)
    if v.ndim != 1:
        raise AnomalyError(f"nll must have shape (N,), got {v.shape}")
    if method in LATENT_METHODS:
        if latent_mean is None or latent_bank is None:
            raise AnomalyError(f"{method} needs the encoder means and the latent bank")
        if len(latent_mean) != len(v):
            raise AnomalyError(f"{len(latent_mean)} latent means for {len(v)} scores")
        if method == "latent_knn":
            return knn_distance(latent_mean, latent_bank, KNN_K)
        if images is None or raw_images is None or fisher_reference is None or reconstruction_errors is None:
            raise AnomalyError("fisher needs the images (model view and grey input), the reconstruction "
                               "errors of their transforms and its reference")
        if len(images) != len(v) or len(raw_images) != len(v):
            raise AnomalyError(f"images for {len(v)} scores expected")
        return fisher_score(fisher_statistics(v, images, raw_images, latent_mean, reconstruction_errors,
                                              latent_bank), fisher_reference)
    if method == "nll":
        return v.copy()
    if method == "typicality":
        if typicality is None:
            raise AnomalyError("typicality needs its reference (centre and scales)")
        return typicality_score(v, typicality)
    if method in ("complexity", "combined"):
        if images is None:
            raise AnomalyError(f"{method} needs the images")
        if len(images) != len(v):
            raise AnomalyError(f"{len(images)} images for {len(v)} scores")
        complexity = v - complexity_nats(images)
        if method == "complexity":
            return complexity
        if typicality is None or complexity_reference is None:
            raise AnomalyError("combined needs the typicality and complexity references")
        upper = (complexity - complexity_reference.center) / complexity_reference.scale_high
        return np.maximum(typicality_score(v, typicality), upper)
    if method == "likelihood_ratio":
        if background_nll is None:
            raise AnomalyError("likelihood_ratio needs the background model's -log p(x)")
        bg = np.asarray(background_nll, dtype=np.float64)
        if bg.shape != v.shape:
            raise AnomalyError(f"background nll shape {bg.shape} differs from nll shape {v.shape}")
        return v - bg
    raise AnomalyError(f"unknown anomaly method {method!r} (known: {', '.join(METHODS)})")


# -- conformal calibration -----------------------------------------------------------------------------
def calibration_counts(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """#{i : calibration_i >= s} for each score s: (N,), (n,) -> (N,) int64.

    A NaN score counts as the most anomalous possible (no calibration score is >= NaN).
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    if cal.ndim != 1 or len(cal) == 0:
        raise AnomalyError("the calibration needs at least one score")
    s = np.asarray(scores, dtype=np.float64)
    return (len(cal) - np.searchsorted(cal, s, side="left")).astype(np.int64)


def conformal_p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """p = (1 + #{calibration >= s}) / (n + 1) for each score s: (N,), (n,) -> (N,) in (0, 1]."""
    n = len(np.asarray(calibration))
    return (1.0 + calibration_counts(scores, calibration)) / (n + 1.0)


def max_count(alpha: float, n: int) -> int:
    """The largest #{calibration >= s} that still gives p <= alpha: floor(alpha (n + 1)) - 1 (may be -1)."""
    if not 0.0 < alpha < 1.0:
        raise AnomalyError(f"alpha must be in (0, 1), got {alpha}")
    # At most n - 1 (alpha < 1): the _EPS guard alone made it n for alpha within 1e-9 / (n + 1) of 1,
    # one past the calibration scores (found by the schema fuzzer: alpha = 0.999999999999).
    return min(math.floor(alpha * (n + 1) + _EPS), n) - 1


def is_anomaly(scores: np.ndarray, calibration: np.ndarray, alpha: float) -> np.ndarray:
    """p <= alpha for each score, decided on the integer count (no float ties): (N,) bool.

    Agrees exactly with conformal_threshold: is_anomaly <=> score > threshold.
    """
    return calibration_counts(scores, calibration) <= max_count(alpha, len(np.asarray(calibration)))


def conformal_threshold(calibration: np.ndarray, alpha: float) -> float:
    """The score t with: p(s) <= alpha  <=>  s > t. The (m+1)-th largest calibration score, m = max_count.

    +inf when alpha < 1 / (n + 1): with so few calibration scores nothing can be flagged at that level.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))[::-1]  # descending
    m = max_count(alpha, len(cal))
    if m < 0:
        return math.inf
    return float(cal[m])


def min_alpha(n: int) -> float:
    """The smallest conformal p-value n calibration scores can give, 1 / (n + 1): at a level alpha below it
    no input can ever be flagged."""
    return 1.0 / (n + 1)


def false_alarm_bound(alpha: float, n: int) -> float:
    """P(p <= alpha) for normal data with n calibration scores (no ties): floor(alpha (n+1)) / (n+1)."""
    return (max_count(alpha, n) + 1) / (n + 1)


def _read_only(values: np.ndarray) -> np.ndarray:
    values.flags.writeable = False  # shared by every request: no caller may change it
    return values


@dataclass(frozen=True)
class MethodCalibration:
    """One method's calibration: its sorted calibration scores and what the score needs."""

    method: str
    scores: tuple[float, ...]  # sorted ascending, n >= 1
    typicality: TypicalityReference | None = None  # typicality and combined
    complexity_reference: TypicalityReference | None = None  # combined
    extra: dict = field(default_factory=dict)
    # fisher: {statistic: sorted validation values}
    fisher_reference: dict[str, tuple[float, ...]] | None = None
    # latent_knn and fisher: the (M, D) encoder means of the training images (the artifact's bank)
    latent_bank: LatentBank | None = field(default=None, compare=False, repr=False)

    @property
    def n(self) -> int:
        return len(self.scores)

    # Arrays derived once, on first use, rather than from the tuples on every request (a 400-value
    # tuple's conversion and sort: 12 us against 6 for the array's, six times per fisher request).
    @functools.cached_property
    def score_array(self) -> np.ndarray:
        """(n,) float64, the sorted calibration scores."""
        return _read_only(np.asarray(self.scores, dtype=np.float64))

    @functools.cached_property
    def fisher_arrays(self) -> dict[str, np.ndarray] | None:
        """fisher_reference as {statistic: (m,) float64 sorted}, or None."""
        if self.fisher_reference is None:
            return None
        return {name: _read_only(np.sort(np.asarray(values, dtype=np.float64)))
                for name, values in self.fisher_reference.items()}

    @property
    def min_alpha(self) -> float:
        return min_alpha(self.n)


@dataclass(frozen=True)
class AnomalyResult:
    method: str
    score: float
    p_value: float
    percentile: float  # 100 * #{calibration scores < score} / n: where the score falls among normal data
    threshold: float  # is_anomaly <=> score > threshold (+inf: cannot flag at this alpha)
    alpha: float
    is_anomaly: bool


def score_and_test(method: str, calibration: MethodCalibration, alpha: float, nll: np.ndarray, *,
                   images: np.ndarray | None = None, background_nll: np.ndarray | None = None,
                   raw_images: np.ndarray | None = None, latent_mean: np.ndarray | None = None,
                   reconstruction_errors: np.ndarray | None = None) -> list[AnomalyResult]:
    """What a route returns per image: score, conformal p-value, threshold, decision at alpha.

    nll: (N,) -log p(x) with the calibration's k; images: (N, C, H, W) as the model scored them
    (complexity); background_nll: (N,) (likelihood_ratio); raw_images: (N, C, H, W) before
    binarization and latent_mean: (N, D) encoder means of `images` (latent_knn, fisher);
    reconstruction_errors: (1 + T, N) those of the images and their transforms (fisher).
    """
    if calibration.method != method:
        raise AnomalyError(f"calibration is for {calibration.method!r}, not {method!r}")
    scores = anomaly_scores(method, nll, images=images, background_nll=background_nll,
                            typicality=calibration.typicality,
                            complexity_reference=calibration.complexity_reference,
                            raw_images=raw_images, latent_mean=latent_mean,
                            reconstruction_errors=reconstruction_errors,
                            latent_bank=calibration.latent_bank,
                            fisher_reference=calibration.fisher_arrays)
    cal = calibration.score_array
    p = conformal_p_values(scores, cal)
    below = 100.0 * (len(cal) - calibration_counts(scores, cal)) / len(cal)
    flags = is_anomaly(scores, cal, alpha)
    threshold = conformal_threshold(cal, alpha)
    return [AnomalyResult(method, float(s), float(pv), float(pct), threshold, alpha, bool(f))
            for s, pv, pct, f in zip(scores, p, below, flags, strict=True)]


def calibration_record(method: str, scores: Sequence[float],
                       typicality: TypicalityReference | None = None,
                       complexity_reference: TypicalityReference | None = None,
                       fisher_reference: dict[str, Sequence[float]] | None = None, **extra: object) -> dict:
    """The manifest entry of one method (docs/artifact-format.md, `anomaly.methods.<method>`)."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if not np.all(np.isfinite(values)):
        raise AnomalyError(f"{method}: calibration scores must be finite")
    record: dict = {"n": len(values), "scores": [float(v) for v in values], "paper": PAPERS[method],
                    **extra}
    if typicality is not None:
        record["reference"] = typicality.to_dict()
    if complexity_reference is not None:
        record["complexity_reference"] = complexity_reference.to_dict()
    if fisher_reference is not None:
        record["statistics"] = {
            name: {"tail": tail, "reference": sorted(float(v) for v in fisher_reference[name])}
            for name, tail in FISHER_STATISTICS.items()}
    return record
