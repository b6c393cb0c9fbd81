"""Loaded models: runtime + one batcher per graph, and the async operations the routes call.

    encode:      x (N, C, H, W) [, y (N,)]    -> mean, log_var (N, D)        via the encoder batcher
    decode:      z (N, D) [, y (N,)]          -> x_mean (N, C, H, W)         via the decoder batcher
    log_weights: x (N, C, H, W), k, seed      -> log_w (N, k) float64        via the log_weights batcher

Importance sampling goes in chunks: image i with k samples becomes ceil(k / chunk) rows of the
log_weights graph, row j holding x_i and eps (chunk, D) drawn from the seed (seed, i, j). Rows of
any requests stack into one (B, chunk, D) batch; outputs beyond k (the padding) are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from functools import partial
from pathlib import Path

import numpy as np

from service.artifacts import OPTIONAL_GRAPHS, ArtifactError, Manifest, discover, load_manifest
from service.config import Settings
from service.engine.batching import Arrays, Batcher, DeviceWorker, RunFn
from service.engine.interface import GRAPH_OF, ModelInfo, Operation, UnknownModel
from service.engine.runtime import Runtime, load_runtime
from service.estimators import chunk_eps
from service.metrics import Metrics

log = logging.getLogger(__name__)


class ServedModel:
    """One model version being served."""

    def __init__(self, manifest: Manifest, runtime: Runtime, worker: DeviceWorker, settings: Settings,
                 metrics: Metrics) -> None:
        self.manifest = manifest
        self.runtime = runtime
        self.worker = worker
        self.chunk = settings.iw_chunk_size
        delay = settings.max_queue_delay_ms / 1000.0
        name = manifest.name
        label = f"{name}:{manifest.version}"

        def batcher(graph: str, run: RunFn, rows: int, queue: int, slice_s: float | None = None) -> Batcher:
            observer = metrics.observer(name, manifest.version, graph)
            observer.limit(queue)
            return Batcher(run=run, worker=worker, max_batch_rows=rows, max_queue_rows=queue,
                           max_delay_s=delay, observer=observer, name=f"{label}/{graph}",
                           max_batch_seconds=slice_s, admission_share=settings.admission_share)

        # log_weights batches are time-sliced so encode/decode batches never wait behind more than
        # one slice of log-likelihood work (see batching's module docstring).
        slice_s = settings.log_weights_slice_ms / 1000.0 if settings.log_weights_slice_ms > 0 else None
        self.batchers = {
            "encoder": batcher("encoder", partial(self._run, "encoder"), settings.max_batch_size,
                               settings.max_queue_size),
            "decoder": batcher("decoder", partial(self._run, "decoder"), settings.max_batch_size,
                               settings.max_queue_size),
            "log_weights": batcher("log_weights", self._run_log_weights, settings.log_weights_batch_rows,
                                   settings.log_weights_queue_rows, slice_s),
        }
        for graph in OPTIONAL_GRAPHS:  # the likelihood-ratio background model, when the artifact has one
            if graph in manifest.graphs:
                run = partial(self._run_log_weights, graph=graph)
                self.batchers[graph] = batcher(graph, run, settings.log_weights_batch_rows,
                                               settings.log_weights_queue_rows, slice_s)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.manifest, self.runtime.name, self.runtime.device, dict(self.runtime.details),
                         {g: b.seconds_per_row for g, b in self.batchers.items()})

    def rows_of(self, operation: Operation, rows: int, k: int = 0) -> int:
        """Batcher rows of a request of `rows` items (log_weights: one row per image and chunk)."""
        return rows * math.ceil(k / self.chunk) if operation == "log_weights" else rows

    async def infer(self, operation: Operation, inputs: Arrays, deadline: float, k: int = 0,
                    seed: int = 0) -> Arrays:
        """The engine interface's operations (see engine/interface.py for shapes)."""
        y = inputs.get("y")
        if operation == "encode":
            mean, log_var = await self.encode(inputs["x"], y, deadline)
            return {"mean": mean, "log_var": log_var}
        if operation == "decode":
            return {"x_mean": await self.decode(inputs["z"], y, deadline)}
        return {"log_w": await self.log_weights(inputs["x"], y, k, seed, deadline, GRAPH_OF[operation])}

    def check_admission(self, operation: Operation, rows: int, deadline: float) -> None:
        """Raise QueueFull at once if `rows` batcher rows would overflow the queue or miss the deadline.

        Called before the body is read or any image decoded, so under overload the 429 costs almost
        nothing; `submit` checks again with the real row count.
        """
        batcher = self.batchers[GRAPH_OF[operation]]
        batcher.check_capacity(rows)
        batcher.check_deadline(rows, deadline)

    # -- operations ------------------------------------------------------------------------------------------
    async def encode(self, x: np.ndarray, y: np.ndarray | None,
                     deadline: float) -> tuple[np.ndarray, np.ndarray]:
        """x (N, C, H, W) -> mean, log_var (N, D) float32."""
        out = await self.batchers["encoder"].submit(self._with_labels({"x": x}, y), deadline)
        return out["mean"], out["log_var"]

    async def decode(self, z: np.ndarray, y: np.ndarray | None, deadline: float) -> np.ndarray:
        """z (N, D) -> E[x|z] (N, C, H, W) float32."""
        out = await self.batchers["decoder"].submit(self._with_labels({"z": z}, y), deadline)
        return out["x_mean"]

    async def log_weights(self, x: np.ndarray, y: np.ndarray | None, k: int, seed: int,
                          deadline: float, graph: str = "log_weights") -> np.ndarray:
        """x (N, C, H, W) -> log importance weights (N, k) float64, seeded per (seed, image, chunk)."""
        n = x.shape[0]
        chunks = math.ceil(k / self.chunk)
        keys = np.empty((n, chunks, 3), dtype=np.int64)  # (seed, image, chunk) per row
        keys[..., 0] = seed
        keys[..., 1] = np.arange(n)[:, None]
        keys[..., 2] = np.arange(chunks)[None, :]
        rows: Arrays = {"x": np.repeat(x, chunks, axis=0), "eps_key": keys.reshape(n * chunks, 3)}
        if y is not None:
            rows["y"] = np.repeat(y, chunks)
        batcher = self.batchers.get(graph)
        if batcher is None:
            raise UnknownModel(f"{self.manifest.name}:{self.manifest.version} has no {graph} graph")
        out = await batcher.submit(rows, deadline)
        return out["log_w"].reshape(n, chunks * self.chunk)[:, :k].astype(np.float64)

    def _with_labels(self, inputs: Arrays, y: np.ndarray | None) -> Arrays:
        if self.manifest.conditional:
            assert y is not None, "conditional models need labels (checked when parsing the request)"
            inputs["y"] = y
        return inputs

    def _run(self, graph: str, feeds: Arrays) -> Arrays:
        # Looked up per call (not bound once), so a runtime can be swapped or wrapped while serving.
        return self.runtime.run(graph, feeds)

    def _run_log_weights(self, feeds: Arrays, graph: str = "log_weights") -> Arrays:
        """On the device thread: draw each row's eps from its key, then run the graph.

        The background graph gets the very same eps for the same keys, as the likelihood ratio needs.
        """
        keys = feeds.pop("eps_key")  # (B, 3)
        d = self.manifest.latent_dim
        feeds["eps"] = np.stack([chunk_eps(int(s), int(i), int(c), self.chunk, d) for s, i, c in keys])
        return self.runtime.run(graph, feeds)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def warm_up_sync(self) -> None:
        """Run every graph at the smallest and largest batch it will see, and check output shapes.

        Runs on the device thread before the model is reported ready, so lazy allocations and kernel
        selection happen here, not in the first requests. The timed runs seed each batcher's cost model.
        """
        m = self.manifest
        for graph, batcher in self.batchers.items():
            timings = []
            for rows in sorted({1, batcher.max_batch_rows}):
                started = time.perf_counter()
                out = self._warm_run(graph, rows)
                if graph == "encoder":
                    expected = {"mean": (rows, m.latent_dim), "log_var": (rows, m.latent_dim)}
                elif graph == "decoder":
                    expected = {"x_mean": (rows, *m.input_shape)}
                else:
                    expected = {"log_w": (rows, self.chunk)}
                shapes = {k: tuple(v.shape) for k, v in out.items()}
                if shapes != expected:
                    raise RuntimeError(f"{m.name}: {graph} returned shapes {shapes}, expected {expected}")
                timings.append((rows, time.perf_counter() - started))
            # The first run of a graph includes one-off allocations: time the smallest batch again.
            started = time.perf_counter()
            self._warm_run(graph, 1)
            timings[0] = (1, time.perf_counter() - started)
            batcher.calibrate(timings[0], timings[-1])

    def _warm_run(self, graph: str, rows: int) -> Arrays:
        """One batch of zeros through `graph` (log_weights graphs draw their eps as in serving)."""
        m = self.manifest
        y = np.zeros(rows, dtype=np.int64)
        if graph == "encoder":
            return self.runtime.run(graph, self._with_labels({"x": np.zeros((rows, *m.input_shape),
                                                                            np.float32)}, y))
        if graph == "decoder":
            return self.runtime.run(graph, self._with_labels({"z": np.zeros((rows, m.latent_dim),
                                                                            np.float32)}, y))
        return self._run_log_weights(self._with_labels({"x": np.zeros((rows, *m.input_shape), np.float32),
                                                        "eps_key": np.zeros((rows, 3), np.int64)}, y), graph)

    def warn_if_limits_exceed_deadline(self, settings: Settings) -> None:
        """Say at start-up which documented maximum requests cannot finish before the deadline here.

        Such requests are refused at admission (422 too_expensive) rather than admitted and timed out.
        """
        batcher = self.batchers["log_weights"]
        budget = settings.request_timeout_s * settings.admission_share
        chunks = math.ceil(settings.max_k / self.chunk)
        largest = math.ceil(settings.max_images * chunks / batcher.batch_rows()) * batcher.batch_seconds()
        if largest > budget:
            fits = max(0, int(budget / batcher.batch_seconds()) * batcher.batch_rows() // chunks)
            log.warning("%s:%s: the largest log-likelihood request (%d images at k=%d) needs about %.0fs of "
                        "device time here, more than the %.0fs deadline allows; such requests are refused "
                        "with 422 (at k=%d, up to %d images fit). Raise VAE_REQUEST_TIMEOUT_S or lower "
                        "VAE_MAX_K / VAE_MAX_IMAGES to match this device.", self.manifest.name,
                        self.manifest.version, settings.max_images, settings.max_k, largest, budget,
                        settings.max_k, fits)

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))


class ModelRegistry:
    """Every served model version by (name, version), and the device workers they share."""

    def __init__(self, models: dict[tuple[str, str], ServedModel], workers: dict[str, DeviceWorker],
                 refused: dict[str, str] | None = None) -> None:
        self.models = models
        self.workers = workers
        self.refused = refused or {}  # version folder -> why it was refused (VAE_ON_BAD_MODEL=skip)

    def get(self, name: str, version: str) -> ServedModel:
        served = self.models.get((name, version))
        if served is None:
            raise UnknownModel(f"model {name!r} version {version!r} is not served")
        return served

    def infos(self) -> dict[str, dict[str, ModelInfo]]:
        """name -> version -> ModelInfo of everything served."""
        out: dict[str, dict[str, ModelInfo]] = {}
        for (name, version), served in self.models.items():
            out.setdefault(name, {})[version] = served.info
        return out

    @classmethod
    async def open(cls, settings: Settings, metrics: Metrics) -> ModelRegistry:
        """Find, verify, load, start and warm up the configured models.

        A model that fails (checksum, format version, corrupt graph, warm-up) is refused with one
        error log line naming it and the reason. With on_bad_model=fail that stops start-up; with
        skip the other models are served, and start-up fails only when no model is left.
        """
        workers: dict[str, DeviceWorker] = {}
        models: dict[tuple[str, str], ServedModel] = {}
        refused: dict[str, str] = {}
        try:
            for directory in discover(settings.models_dir, settings.models, settings.serve_all_versions):
                try:
                    model = await cls._load_one(directory, settings, metrics, workers, models)
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
                    refused[str(directory)] = reason
                    metrics.model_refused.labels(directory.parent.name, directory.name).set(1)
                    log.error("refusing model %s/%s: %s", directory.parent.name, directory.name, reason)
                    if settings.on_bad_model == "fail":
                        raise ArtifactError(f"refusing model {directory.parent.name}/{directory.name}: "
                                            f"{reason} (VAE_ON_BAD_MODEL=skip serves the other models)"
                                            ) from exc
                    continue
                models[(model.manifest.name, model.manifest.version)] = model
            if not models:
                raise ArtifactError(f"no model could be loaded from {settings.models_dir}: "
                                    + "; ".join(f"{d}: {r}" for d, r in refused.items()))
        except BaseException:
            await cls(models, workers).close()
            raise
        return cls(models, workers, refused)

    @staticmethod
    async def _load_one(directory: Path, settings: Settings, metrics: Metrics,
                        workers: dict[str, DeviceWorker],
                        models: dict[tuple[str, str], ServedModel]) -> ServedModel:
        started = time.perf_counter()
        manifest = load_manifest(directory, settings.runtime)
        if (manifest.name, manifest.version) in models:
            raise RuntimeError(f"model {manifest.name} version {manifest.version} is configured twice")
        runtime = load_runtime(manifest, settings.runtime, settings.device, settings.cpu_intra_op_threads)
        worker = workers.get(runtime.device)
        if worker is None:
            worker = workers[runtime.device] = DeviceWorker(runtime.device, settings.device_instances)
        model = ServedModel(manifest, runtime, worker, settings, metrics)
        if settings.warmup:
            await worker.call(model.warm_up_sync)
        model.start()
        labels = (manifest.name, manifest.version, runtime.name, runtime.device)
        metrics.model_ready.labels(*labels).set(1)
        log.info("loaded %s version %s (%s on %s) in %.2fs", manifest.name, manifest.version,
                 runtime.name, runtime.device, time.perf_counter() - started)
        model.warn_if_limits_exceed_deadline(settings)
        return model

    async def stop_batchers(self) -> None:
        """Fail every queued and running submission with BatcherClosed (503); refuse new ones."""
        await asyncio.gather(*(m.stop() for m in self.models.values()))

    async def close(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.models.values()))
        for worker in self.workers.values():
            worker.close()
