"""The Gaussian-latent family: q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), a Bernoulli or
Gaussian decoder. Covers the conv/MLP VAE, the beta-VAE, the conditional VAE, the IWAE and the
linear-Gaussian model: all export the same three graphs (service/artifacts.py, GRAPH_IO).

Importance sampling (log_likelihood, anomaly_score): image i of a request with k samples becomes
ceil(k / chunk) rows of a log-weights graph, row r holding x_i and the samples r*chunk ..
(r+1)*chunk - 1 whose noise is drawn on the device thread from the key (seed, i, r*chunk)
(families/noise.py). Rows of any requests stack into one (B, chunk, D) batch; samples past k (the
padding of the last row) are dropped. The noise of a sample depends on (seed, i, j) alone, so neither
`chunk` nor how rows are batched changes a result.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Iterable
from typing import Any

import numpy as np

from service import anomaly
from service.artifacts import AnomalyCalibration, Manifest, Preprocessing
from service.estimators import iw_estimates
from service.families.base import Arrays, FamilyError, GraphRunner, Operation, Options
from service.families.noise import prior_latents, rows_eps

DEFAULT_CHUNK = 128  # samples per log-weights row; an execution detail (results do not depend on it)
LOG_WEIGHTS_GRAPHS = ("log_weights", "background_log_weights")

# What each anomaly method needs from the model besides -log p(x) (anomaly_inputs' `needs`).
METHOD_NEEDS: dict[str, frozenset[str]] = {
    "likelihood_ratio": frozenset({"background_nll"}),
    "latent_knn": frozenset({"latent_mean"}),
    "fisher": frozenset({"latent_mean", "reconstruction_errors"}),
}

class GaussianLatentVAE:
    """The operations of one Gaussian-latent model (shapes in service/families/base.py)."""

    name = "gaussian"

    def __init__(self, *, latent_dim: int, input_shape: tuple[int, int, int], preprocessing: Preprocessing,
                 likelihood: str, conditional: bool, calibration: AnomalyCalibration | None = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        self.latent_dim = latent_dim
        self.input_shape = input_shape
        self.preprocessing = preprocessing
        self.likelihood = likelihood
        self.conditional = conditional
        self.calibration = calibration
        self.chunk = chunk

    @classmethod
    def from_manifest(cls, manifest: Manifest, chunk: int = DEFAULT_CHUNK) -> GaussianLatentVAE:
        return cls(latent_dim=manifest.latent_dim, input_shape=manifest.input_shape,
                   preprocessing=manifest.preprocessing, likelihood=manifest.likelihood,
                   conditional=manifest.conditional, calibration=manifest.anomaly, chunk=chunk)

    # -- cost and execution ------------------------------------------------------------------------------
    def work(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """Graph -> rows that one request of `items` images (or latents, or samples) submits.

        The one cost formula: the inference process admits with it, and so do the HTTP workers before
        they read a body.
        """
        if operation == "encode":
            return {"encoder": items}
        if operation in ("decode", "sample"):
            return {"decoder": items}
        if operation == "reconstruct":
            return {"encoder": items, "decoder": items}
        rows = items * math.ceil(options.k / self.chunk)
        if operation == "log_likelihood":
            return {options.graph: rows}
        work = {"log_weights": rows}
        needs = METHOD_NEEDS.get(options.method, frozenset())
        if "background_nll" in needs:
            work["background_log_weights"] = rows
        if "reconstruction_errors" in needs:
            views = items * (1 + len(anomaly.transform_names(*self.input_shape[1:])))
            work.update(encoder=views, decoder=views)
        elif "latent_mean" in needs:
            work["encoder"] = items
        return work

    def device_feeds(self, graph: str, feeds: Arrays) -> Arrays:
        """On the device thread, just before a batch runs: draw the noise of log-weights rows."""
        if graph in LOG_WEIGHTS_GRAPHS:
            feeds = dict(feeds)
            feeds["eps"] = rows_eps(feeds.pop("eps_key"), self.chunk, self.latent_dim)  # (B, chunk, D)
        return feeds

    def warm_feeds(self, graph: str, rows: int) -> tuple[Arrays, dict[str, tuple[int, ...]]]:
        """A batch of `rows` zero rows of `graph` (before device_feeds) and the output shapes it must give."""
        x = np.zeros((rows, *self.input_shape), np.float32)
        if graph == "encoder":
            feeds, shapes = {"x": x}, {"mean": (rows, self.latent_dim), "log_var": (rows, self.latent_dim)}
        elif graph == "decoder":
            feeds = {"z": np.zeros((rows, self.latent_dim), np.float32)}
            shapes = {"x_mean": (rows, *self.input_shape)}
        else:
            feeds, shapes = {"x": x, "eps_key": np.zeros((rows, 3), np.int64)}, {"log_w": (rows, self.chunk)}
        return self._labelled(feeds, np.zeros(rows, np.int64)), shapes

    # -- operations --------------------------------------------------------------------------------------
    async def run(self, operation: Operation, runner: GraphRunner, inputs: Arrays,
                  options: Options) -> Arrays:
        """One operation of one request (see service/families/base.py for shapes)."""
        y = inputs.get("y")
        if operation == "encode":
            return await self.encode(runner, inputs["x"], y)
        if operation == "decode":
            return await self.decode(runner, inputs["z"], y)
        if operation == "sample":
            z = prior_latents(options.seed, options.n, self.latent_dim, options.temperature)  # (n, D)
            return {"z": z, **await self.decode(runner, z, y)}
        if operation == "reconstruct":
            return await self.reconstruct(runner, inputs["x"], y)
        if operation == "log_likelihood":
            return await self.log_likelihood(runner, inputs["x"], y, options.k, options.seed, options.graph)
        if operation == "anomaly_score":
            return await self.anomaly_score(runner, inputs["x"], y, options)
        raise ValueError(f"unknown operation {operation!r}")

    async def encode(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        """x (N, C, H, W) -> mean, log_var (N, D) float32."""
        return await runner("encoder", self._labelled({"x": x}, y))

    async def decode(self, runner: GraphRunner, z: np.ndarray, y: np.ndarray | None) -> Arrays:
        """z (N, D) -> x_mean = E[x|z] (N, C, H, W) float32."""
        return await runner("decoder", self._labelled({"z": z}, y))

    async def reconstruct(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        """Decode the posterior mean: x_mean (N, C, H, W) and the squared error against x, sse (N,) f64."""
        mean = (await self.encode(runner, x, y))["mean"]  # (N, D)
        x_mean = (await self.decode(runner, mean, y))["x_mean"]  # (N, C, H, W)
        sq = (x_mean.astype(np.float64) - x.astype(np.float64)) ** 2
        return {"x_mean": x_mean, "sse": sq.reshape(len(x), -1).sum(axis=1)}

    async def log_weights(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None, k: int, seed: int,
                          graph: str = "log_weights") -> np.ndarray:
        """log importance weights of the likelihood view of x: (N, C, H, W) -> (N, k) float64."""
        view = self.preprocessing.likelihood_view(x)
        n, rows = len(view), math.ceil(k / self.chunk)
        keys = np.empty((n, rows, 3), dtype=np.int64)  # (seed, image, first sample) per row
        keys[..., 0] = seed
        keys[..., 1] = np.arange(n)[:, None]
        keys[..., 2] = np.arange(rows)[None, :] * self.chunk
        feeds = {"x": np.repeat(view, rows, axis=0), "eps_key": keys.reshape(n * rows, 3)}
        y_rows = None if y is None else np.repeat(y, rows)
        out = await runner(graph, self._labelled(feeds, y_rows))
        return out["log_w"].reshape(n, rows * self.chunk)[:, :k].astype(np.float64)

    async def log_likelihood(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None, k: int,
                             seed: int, graph: str = "log_weights") -> Arrays:
        """IW bound on log p(x), the ELBO and the bound's standard error per image: (N,) float64 each."""
        log_w = await self.log_weights(runner, x, y, k, seed, graph)  # (N, k)
        estimates = iw_estimates(log_w)
        if not np.isfinite(estimates["log_likelihood"]).all():
            raise FamilyError("the model produced non-finite log-likelihoods")
        return estimates

    async def anomaly_inputs(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None, k: int,
                             seed: int, needs: Iterable[str]) -> dict[str, Any]:
        """What anomaly.anomaly_scores needs for the methods whose METHOD_NEEDS are in `needs`.

        Always: nll and standard_error (N,), images (the likelihood view) and raw_images (x). The method's
        model work runs beside the log-weights, not after them (its rows queue on other graphs' batchers
        and run between log-weights slices); the likelihood ratio uses the very same noise (same seed).
        """
        needs = set(needs)
        view = self.preprocessing.likelihood_view(x)
        work: dict[str, Awaitable[Any]] = {"main": self.log_likelihood(runner, x, y, k, seed)}
        if "background_nll" in needs:
            work["background"] = self.log_likelihood(runner, x, y, k, seed, "background_log_weights")
        if "reconstruction_errors" in needs:
            work["orientation"] = self.orientation_inputs(runner, view, y)
        elif "latent_mean" in needs:
            # The bank holds encoder means of the training images' likelihood view: encode the same view.
            work["latent"] = self.encode(runner, view, y)
        done = dict(zip(work, await _gather_or_cancel(work.values()), strict=True))
        out: dict[str, Any] = {"nll": -done["main"]["log_likelihood"],
                               "standard_error": done["main"]["standard_error"],
                               "images": view, "raw_images": x}
        if "background" in done:
            out["background_nll"] = -done["background"]["log_likelihood"]
        if "orientation" in done:
            out["latent_mean"], out["reconstruction_errors"] = done["orientation"]
        elif "latent" in done:
            out["latent_mean"] = done["latent"]["mean"]
        return out

    async def anomaly_score(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None,
                            options: Options) -> Arrays:
        """The method's score, conformal p-value against the calibration, threshold and decision at alpha;
        standard_error is that of the score for anomaly.STANDARD_ERROR_METHODS, else NaN."""
        if self.calibration is None or options.method not in self.calibration.methods:
            raise FamilyError(f"no calibration for anomaly method {options.method!r}")
        inputs = await self.anomaly_inputs(runner, x, y, options.k, options.seed,
                                           METHOD_NEEDS.get(options.method, ()))
        se = inputs.pop("standard_error")
        if options.method not in anomaly.STANDARD_ERROR_METHODS:
            se = np.full_like(se, np.nan)  # not this score's error (anomaly.STANDARD_ERROR_METHODS): none
        try:
            tested = anomaly.score_and_test(options.method, self.calibration.methods[options.method],
                                            options.alpha, inputs.pop("nll"), **inputs)
        except anomaly.AnomalyError as exc:
            raise FamilyError(f"anomaly scoring failed: {exc}") from exc
        return {"score": np.array([t.score for t in tested]),
                "p_value": np.array([t.p_value for t in tested]),
                "percentile": np.array([t.percentile for t in tested]),
                "threshold": np.array([t.threshold for t in tested]),
                "is_anomaly": np.array([t.is_anomaly for t in tested], dtype=bool), "standard_error": se}

    async def orientation_inputs(self, runner: GraphRunner, view: np.ndarray,
                           y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """fisher's model outputs for the view (N, C, H, W): the encoder means (N, D) and the
        reconstruction errors (1 + T, N) of the view and its geometric transforms
        (anomaly.orientation_gain)."""
        rows = anomaly.orientation_views(view)  # ((1 + T) N, C, H, W)
        y_rows = None if y is None else np.tile(y, len(rows) // len(view))
        means = (await self.encode(runner, rows, y_rows))["mean"]  # ((1 + T) N, D)
        recon = (await self.decode(runner, means, y_rows))["x_mean"]  # ((1 + T) N, C, H, W)
        errors = anomaly.reconstruction_error(rows, recon, self.likelihood)
        return means[:len(view)], errors.reshape(-1, len(view))

    def _labelled(self, feeds: Arrays, y: np.ndarray | None) -> Arrays:
        if self.conditional:
            assert y is not None, "conditional models need labels (checked when parsing the request)"
            feeds["y"] = y
        return feeds


async def _gather_or_cancel(awaitables: Iterable[Awaitable[Any]]) -> list[Any]:
    """Every result, run concurrently; the first failure cancels the others, so a refused or failed part
    does not leave the other parts' rows queued for nobody."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
