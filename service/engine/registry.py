"""Loaded models: a runtime, the model's family and one batcher per graph.

An operation (service/families) runs whole here: its pipeline submits rows to the batchers of the
graphs it calls, so rows of every request and every HTTP worker share batches, and the HTTP side
sends one message per request and gets one back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np

from service.artifacts import ArtifactError, Manifest, discover, load_manifest
from service.config import Settings
from service.engine.batching import Arrays, Batcher, DeviceExecutor
from service.engine.interface import ModelInfo, OperationFailed, UnknownModel
from service.engine.runtime import Runtime, load_runtime
from service.families import Family, FamilyError, Operation, Options, family_for
from service.metrics import Metrics

log = logging.getLogger(__name__)
WARMUP_REPEATS = 3  # timed runs per warm-up batch size; their median seeds the cost model


class ServedModel:
    """One model version being served."""

    def __init__(self, manifest: Manifest, runtime: Runtime, worker: DeviceExecutor, settings: Settings,
                 metrics: Metrics) -> None:
        self.manifest = manifest
        self.runtime = runtime
        self.worker = worker
        self.family: Family = family_for(manifest, settings.iw_chunk_size)
        delay = settings.max_queue_delay_ms / 1000.0
        name = manifest.name
        label = f"{name}:{manifest.version}"

        def batcher(graph: str, rows: int, queue: int, slice_s: float | None = None) -> Batcher:
            observer = metrics.observer(name, manifest.version, graph)
            observer.limit(queue)
            return Batcher(run=partial(self._run, graph), worker=worker, max_batch_rows=rows,
                           max_queue_rows=queue, max_delay_s=delay, observer=observer,
                           name=f"{label}/{graph}", max_batch_seconds=slice_s,
                           admission_share=settings.admission_share)

        # log_weights batches are time-sliced so encode/decode batches never wait behind more than
        # one slice of log-likelihood work (see batching's module docstring).
        slice_s = settings.log_weights_slice_ms / 1000.0 if settings.log_weights_slice_ms > 0 else None
        # One batcher per graph the artifact has (but the family's unbatched ones, e.g. those only its
        # device loops call) and per device loop; the family names its importance-sampling graphs, which
        # take log-weights rows and time slices, the others take rows of single items.
        family = self.family
        names = [g for g in manifest.graphs if g not in family.unbatched_graphs] + sorted(family.device_loops)
        self.batchers: dict[str, Batcher] = {
            graph: batcher(graph, settings.log_weights_batch_rows, settings.log_weights_queue_rows, slice_s)
            if graph in family.sliced_graphs
            else batcher(graph, settings.max_batch_size, settings.max_queue_size)
            for graph in names}

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.manifest, self.runtime.name, self.runtime.device, dict(self.runtime.details),
                         {g: b.seconds_per_row for g, b in self.batchers.items()}, self.family.chunk)

    async def infer(self, operation: Operation, inputs: Arrays, deadline: float, options: Options) -> Arrays:
        """One operation of one request, its graph calls through the batchers (see service/families)."""
        # A request with no time-sliced work keeps an execution thread free of log-likelihood slices.
        sliced = not self.family.sliced_graphs.isdisjoint(self.family.work(operation, 1, options))
        with contextlib.nullcontext() if sliced else self.worker.cheap_request():
            try:
                return await self.family.run(operation, partial(self._submit, deadline=deadline), inputs,
                                             options)
            except FamilyError as exc:
                raise OperationFailed(str(exc)) from None

    def check_admission(self, operation: Operation, items: int, options: Options, deadline: float) -> None:
        """Raise QueueFull / TooExpensive at once if this request's rows would overflow a queue or miss
        the deadline on any graph it uses.

        Called before the body is read or any image decoded, so under overload the 429 costs almost
        nothing; each submission is checked again with its real rows.
        """
        at_once = self.family.work_at_once(operation, items, options)
        for graph, rows in self.family.work(operation, items, options).items():
            batcher = self._batcher(graph)
            # Queue space for what is queued at one time; larger work goes in parts (see _submit).
            batcher.check_capacity(min(at_once[graph], batcher.max_queue_rows))
            batcher.check_deadline(rows, deadline)

    async def _submit(self, graph: str, feeds: Arrays, deadline: float) -> Arrays:
        """The GraphRunner of one request: its rows of `graph` through that graph's batcher.

        Work larger than the queue (fisher encodes 1 + T views of every image) goes in parts of at most
        the queue's size, one after the other, so no request is refused as too big for a queue it would
        have alone.
        """
        batcher = self._batcher(graph)
        rows = len(next(iter(feeds.values())))
        step = batcher.max_queue_rows
        if rows <= step:
            return await batcher.submit(feeds, deadline)
        parts = [await batcher.submit({k: v[i:i + step] for k, v in feeds.items()}, deadline)
                 for i in range(0, rows, step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _batcher(self, graph: str) -> Batcher:
        batcher = self.batchers.get(graph)
        if batcher is None:
            raise UnknownModel(f"{self.manifest.name}:{self.manifest.version} has no {graph} graph")
        return batcher

    def _run(self, graph: str, feeds: Arrays) -> Arrays:
        """On the device thread: the family's last step (e.g. noise from keys), then the runtime.

        The runtime is looked up per call (not bound once), so it can be swapped or wrapped while serving.
        A device loop (e.g. ancestral sampling) calls its graphs directly, several times per batch.
        """
        if graph in self.family.device_loops:
            return self.family.device_loop(graph, self.runtime.run, feeds)
        return self.runtime.run(graph, self.family.device_feeds(graph, feeds))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def warm_up_sync(self) -> None:
        """Run every graph at the smallest and largest batch it will see, and check output shapes.

        Runs on the device thread before the model is reported ready, so lazy allocations and kernel
        selection happen here, not in the first requests. The timings seed each batcher's cost model,
        which admission and the start-up warning use: the first run of each size is not timed (one-off
        allocations), and the median of WARMUP_REPEATS further runs is taken, so one slow run (another
        process on the cores) does not move the estimate; a single timing could make it vary tenfold.
        """
        for graph, batcher in self.batchers.items():
            one = self._timed_warm_up(graph, 1)
            largest = batcher.max_batch_rows
            if batcher.max_batch_seconds is not None:
                # A time-sliced batcher (log weights) never runs more rows than fit its slice: warm up and
                # calibrate at about two slices' worth, not at its row cap (mnist-vae's 64-row log_weights
                # batch takes 1.4 s on 2 CPU cores: 4 runs of it were most of a 9 s load, and of a rollout).
                largest = max(2, min(largest, math.ceil(2 * batcher.max_batch_seconds / max(one[1], 1e-6))))
            batcher.calibrate(one, self._timed_warm_up(graph, largest) if largest > 1 else one)

    def _timed_warm_up(self, graph: str, rows: int) -> tuple[int, float]:
        """(rows, median seconds of WARMUP_REPEATS runs after an untimed one); checks output shapes."""
        feeds, expected = self.family.warm_feeds(graph, rows)
        out = self._run(graph, feeds)
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        if shapes != expected:
            raise RuntimeError(f"{self.manifest.name}: {graph} returned shapes {shapes}, expected {expected}")
        seconds = []
        for _ in range(WARMUP_REPEATS):
            started = time.perf_counter()
            self._run(graph, feeds)
            seconds.append(time.perf_counter() - started)
        return rows, statistics.median(seconds)

    def too_expensive(self, operation: Operation, items: int, options: Options,
                      left_s: float) -> tuple[str, float] | None:
        """The graph that admission would refuse this request on as too expensive with `left_s` seconds
        left, and the device seconds it needs there; None when no graph refuses it (the same test as
        check_admission's, graph by graph, from the family's work())."""
        for graph, rows in self.family.work(operation, items, options).items():
            needed = self._batcher(graph).too_expensive(rows, left_s)
            if needed is not None:
                return graph, needed
        return None

    def warn_if_limits_exceed_deadline(self, settings: Settings) -> None:
        """Say at start-up when the documented largest log-likelihood request cannot finish before the
        deadline here, and how many images at max_k do: the largest count admission accepts on an idle
        device (the same test, Batcher.too_expensive, over the same rows, family.work()).

        Such requests are refused at admission (422 too_expensive) rather than admitted and timed out.
        """
        budget = settings.request_timeout_s * settings.admission_share  # a fresh request's time left
        options = Options(k=settings.max_k)
        largest = self.too_expensive("log_likelihood", settings.max_images, options, budget)
        if largest is None:
            return
        fits = next((n for n in range(settings.max_images - 1, 0, -1)
                     if self.too_expensive("log_likelihood", n, options, budget) is None), 0)
        log.warning("%s:%s: the largest log-likelihood request (%d images at k=%d) needs about %.0fs of "
                    "device time here, more than the %.0fs deadline allows; such requests are refused "
                    "with 422 (at k=%d, up to %d images fit). Raise VAE_REQUEST_TIMEOUT_S or lower "
                    "VAE_MAX_K / VAE_MAX_IMAGES to match this device.", self.manifest.name,
                    self.manifest.version, settings.max_images, settings.max_k, largest[1], budget,
                    settings.max_k, fits)

    def note_anomaly_default(self, settings: Settings) -> None:
        """Say at start-up when VAE_ANOMALY_METHOD is not calibrated for this model, so the fallback to the
        model's own default method is visible rather than silent."""
        cal = self.manifest.anomaly
        if cal is None:
            return
        method = settings.default_anomaly_method(cal.methods, cal.default_method)
        if settings.anomaly_alpha and settings.anomaly_alpha < cal.methods[method].min_alpha:
            log.warning("%s:%s: VAE_ANOMALY_ALPHA=%g is below %.4g, the smallest p-value its %d calibration "
                        "scores of %s can give, so its anomaly requests without alpha= are refused with 422",
                        self.manifest.name, self.manifest.version, settings.anomaly_alpha,
                        cal.methods[method].min_alpha, cal.methods[method].n, method)
        if settings.anomaly_method is None or settings.anomaly_method in cal.methods:
            return
        log.warning("%s:%s has no calibration for VAE_ANOMALY_METHOD=%s; its anomaly scores default to its "
                    "own method %r (it offers %s)", self.manifest.name, self.manifest.version,
                    settings.anomaly_method, settings.default_anomaly_method(cal.methods, cal.default_method),
                    ", ".join(sorted(cal.methods)))

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))


class ModelRegistry:
    """Every served model version by (name, version), and the device workers they share."""

    def __init__(self, models: dict[tuple[str, str], ServedModel], workers: dict[str, DeviceExecutor],
                 refused: dict[str, str] | None = None) -> None:
        self.models = models
        self.workers = workers
        self.refused = refused or {}  # version folder -> why it was refused (VAE_ON_BAD_MODEL=skip)
        # version folder -> its files when refused: a rescan retries it only once they change
        self._refused_signatures: dict[str, tuple] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: dict[tuple[str, str], ServedModel] = {}  # no longer listed, still answering

    def get(self, name: str, version: str) -> ServedModel:
        # A retired version still answers what was addressed to it before every worker knew.
        served = self.models.get((name, version)) or self._retired.get((name, version))
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
        workers: dict[str, DeviceExecutor] = {}
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
        registry = cls(models, workers, refused)
        registry._refused_signatures = {d: _signature(Path(d)) for d in refused}
        return registry

    @staticmethod
    async def _load_one(directory: Path, settings: Settings, metrics: Metrics,
                        workers: dict[str, DeviceExecutor],
                        models: dict[tuple[str, str], ServedModel]) -> ServedModel:
        started = time.perf_counter()
        manifest = load_manifest(directory, settings.runtime)
        if (manifest.name, manifest.version) in models:
            raise RuntimeError(f"model {manifest.name} version {manifest.version} is configured twice")
        runtime = load_runtime(manifest, settings.runtime, settings.device, settings.cpu_intra_op_threads)
        worker = workers.get(runtime.device)
        if worker is None:
            instances = settings.instances_on(runtime.device)
            worker = workers[runtime.device] = DeviceExecutor(runtime.device, instances)
        model = ServedModel(manifest, runtime, worker, settings, metrics)
        if settings.warmup:
            await worker.call(model.warm_up_sync)
        model.start()
        labels = (manifest.name, manifest.version, runtime.name, runtime.device)
        metrics.model_ready.labels(*labels).set(1)
        log.info("loaded %s version %s (%s on %s) in %.2fs", manifest.name, manifest.version,
                 runtime.name, runtime.device, time.perf_counter() - started)
        model.warn_if_limits_exceed_deadline(settings)
        model.note_anomaly_default(settings)
        return model

    async def rescan(self, settings: Settings, metrics: Metrics) -> bool:
        """Bring the served set in line with the models directory, without stopping what is served:
        new version folders (and new models) are verified, loaded and warmed up beside the running ones
        and only then served; folders that are gone are retired (their requests in flight finish); a
        folder that fails is refused (one error line, vae_model_refused 1) and retried only once its
        files change. True when the served set changed."""
        try:
            directories = discover(settings.models_dir, settings.models, settings.serve_all_versions)
        except ArtifactError as exc:
            log.error("rescanning the models: %s; still serving %s", exc, _names(self.models))
            return False
        wanted = {(d.parent.name, d.name): d for d in directories}
        changed = False
        for key, directory in wanted.items():
            signature = _signature(directory)
            if key in self.models or self._refused_signatures.get(str(directory)) == signature:
                continue
            try:
                model = await self._load_one(directory, settings, metrics, self.workers, self.models)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
                self.refused[str(directory)] = reason
                self._refused_signatures[str(directory)] = signature
                metrics.model_refused.labels(*key).set(1)
                log.error("refusing model %s/%s: %s; still serving %s", *key, reason, _names(self.models))
                continue
            self.models[(model.manifest.name, model.manifest.version)] = model
            self.refused.pop(str(directory), None)
            self._refused_signatures.pop(str(directory), None)
            metrics.model_refused.labels(*key).set(0)
            log.info("now serving %s version %s", *key)
            changed = True
        for key in [k for k in self.models if k not in wanted]:
            served = self.models.pop(key)
            metrics.model_ready.labels(*key, served.runtime.name, served.runtime.device).set(0)
            log.info("retiring %s version %s (its folder is gone): no longer listed; requests addressed to "
                     "it are answered for %g s more, then it stops", *key, settings.request_timeout_s)
            self._retired[key] = served
            self._retiring.add(asyncio.create_task(self._retire(key, served, settings.request_timeout_s + 1)))
            changed = True
        return changed

    async def _retire(self, key: tuple[str, str], served: ServedModel, grace_s: float) -> None:
        """Stop a retired version once every request that could still use it is past its deadline: the
        ones in flight, and the ones a worker sent before it learned of the change (it is not listed
        any more, but get() still finds it meanwhile)."""
        try:
            await asyncio.sleep(grace_s)
        finally:
            if self._retired.get(key) is served:  # (not if the folder came back and went again since)
                del self._retired[key]
            await served.stop()
            self._retiring.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def stop_batchers(self) -> None:
        """Fail every queued and running submission with BatcherClosed (503); refuse new ones."""
        await asyncio.gather(*(m.stop() for m in self.models.values()))

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()  # stops its model at once
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(m.stop() for m in self.models.values()))
        for worker in self.workers.values():
            worker.close()


def _names(models: dict[tuple[str, str], ServedModel]) -> str:
    return ", ".join(f"{name}:{version}" for name, version in sorted(models)) or "nothing"


def _signature(directory: Path) -> tuple:
    """The files of a version folder (name, size, modification time): changes when a copy completes or
    a fixed artifact replaces a broken one."""
    try:
        return tuple(sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                            for p in directory.rglob("*") if p.is_file()))
    except OSError:
        return ()
