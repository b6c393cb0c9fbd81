"""What every family that models images shares: log-likelihood from importance weights, reconstruction
errors, and the anomaly scores built on them (service/anomaly.py). A family supplies the model-specific
steps as hooks:

    encode / decode / sample     its own latent representation (shapes in service/families/base.py)
    log_weights(x, k, seed)      (N, k) importance log-weights of the likelihood view, seeded per sample
    latent_vectors(x)            (N, L) vectors the latent_knn and fisher scores compare (the latent bank)
    reconstruct_rows(x)          those vectors and E[x | the posterior's summary], (N, C, H, W)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np

from service import anomaly
from service.artifacts import AnomalyCalibration, Preprocessing
from service.estimators import iw_estimates
from service.families.base import Arrays, FamilyError, GraphRunner, Operation, Options

# What each anomaly method needs from the model besides -log p(x) (anomaly_inputs' `needs`).
METHOD_NEEDS: dict[str, frozenset[str]] = {
    "likelihood_ratio": frozenset({"background_nll"}),
    "latent_knn": frozenset({"latent_mean"}),
    "fisher": frozenset({"latent_mean", "reconstruction_errors"}),
}


class ImageFamily:
    """The operations shared by every image model family; subclasses implement the hooks."""

    name = "abstract"
    device_loops: frozenset[str] = frozenset()  # batchers whose device work is a loop of the family's
    unbatched_graphs: frozenset[str] = frozenset()  # graphs with no batcher (only device loops call them)

    def __init__(self, *, input_shape: tuple[int, int, int], preprocessing: Preprocessing, likelihood: str,
                 conditional: bool, calibration: AnomalyCalibration | None, chunk: int) -> None:
        self.input_shape = input_shape
        self.preprocessing = preprocessing
        self.likelihood = likelihood
        self.conditional = conditional
        self.calibration = calibration
        self.chunk = chunk

    # -- hooks -------------------------------------------------------------------------------------------
    async def encode(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        raise NotImplementedError

    async def decode(self, runner: GraphRunner, z: np.ndarray, y: np.ndarray | None) -> Arrays:
        raise NotImplementedError

    async def sample(self, runner: GraphRunner, y: np.ndarray | None, options: Options) -> Arrays:
        raise NotImplementedError

    async def log_weights(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None, k: int, seed: int,
                          graph: str = "log_weights") -> np.ndarray:
        raise NotImplementedError

    async def latent_vectors(self, runner: GraphRunner, view: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    async def reconstruct_rows(self, runner: GraphRunner, x: np.ndarray,
                               y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

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
            return await self.sample(runner, y, options)
        if operation == "reconstruct":
            return await self.reconstruct(runner, inputs["x"], y)
        if operation == "log_likelihood":
            return await self.log_likelihood(runner, inputs["x"], y, options.k, options.seed, options.graph)
        if operation == "anomaly_score":
            return await self.anomaly_score(runner, inputs["x"], y, options)
        raise ValueError(f"unknown operation {operation!r}")

    async def reconstruct(self, runner: GraphRunner, x: np.ndarray, y: np.ndarray | None) -> Arrays:
        """Decode the posterior's summary: x_mean (N, C, H, W) and its squared error against x, sse (N,)."""
        x_mean = (await self.reconstruct_rows(runner, x, y))[1]  # (N, C, H, W)
        sq = (x_mean.astype(np.float64) - x.astype(np.float64)) ** 2
        return {"x_mean": x_mean, "sse": sq.reshape(len(x), -1).sum(axis=1)}

    def work(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        raise NotImplementedError

    def device_loop(self, name: str, run_graph: Callable[[str, Arrays], Arrays], feeds: Arrays) -> Arrays:
        """On the device thread, one batch of a device loop (`device_loops`), calling graphs directly."""
        raise NotImplementedError(f"{self.name} has no device loop {name!r}")

    def work_at_once(self, operation: Operation, items: int, options: Options) -> dict[str, int]:
        """The rows queued at one time: all of work() unless a family submits step by step."""
        return self.work(operation, items, options)

    def anomaly_work(self, items: int, options: Options, rows: int) -> dict[str, int]:
        """Graph -> rows of an anomaly_score request of `items` images beside its `rows` log-weights rows
        (the latent vectors come from the encoder, reconstructions from the encoder and decoder)."""
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
            work["latent"] = self.latent_vectors(runner, view, y)
        done = dict(zip(work, await _gather_or_cancel(work.values()), strict=True))
        out: dict[str, Any] = {"nll": -done["main"]["log_likelihood"],
                               "standard_error": done["main"]["standard_error"],
                               "images": view, "raw_images": x}
        if "background" in done:
            out["background_nll"] = -done["background"]["log_likelihood"]
        if "orientation" in done:
            out["latent_mean"], out["reconstruction_errors"] = done["orientation"]
        elif "latent" in done:
            out["latent_mean"] = done["latent"]
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
        means, recon = await self.reconstruct_rows(runner, rows, y_rows)  # ((1 + T) N, L), (.., C, H, W)
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
