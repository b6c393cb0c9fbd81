"""Prometheus collectors, split the way Triton splits them: requests, queue time, compute time, batches.

Each app gets its own CollectorRegistry so tests (and several apps in one process) never collide.
Label values are bounded: endpoints are route templates, never raw paths; models are loaded names.

Several processes (HTTP workers + the inference process): prometheus-client's multiprocess mode.
The supervisor sets PROMETHEUS_MULTIPROC_DIR for its children; each process writes its own values
to files there, and /metrics (in any HTTP worker) aggregates all of them: counters and histograms
summed, gauges by their `multiprocess_mode` (live sums for depths, maxima for peaks and limits).
"""

from __future__ import annotations

import os

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: str) -> None:
    """Write this process's metrics to files in `directory` (call before creating Metrics()).

    prometheus-client chooses its value class when it is first imported; a forked child of a parent
    that imported it earlier must choose again.
    """
    os.environ[MULTIPROC_ENV] = directory
    # Its default process identifier is os.getpid, called on every inc/set/observe to notice a fork:
    # a system call each, ~10 per request. The pid cached here is renewed in every forked child.
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)


_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


def _process_id() -> int:
    return _pid


os.register_at_fork(after_in_child=_renew_pid)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """All collectors of one app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vae_requests", "HTTP requests by endpoint (route template) and status",
                                ["endpoint", "method", "status"], registry=r)
        self.request_latency = Histogram("vae_request_duration_seconds", "HTTP request latency, end to end",
                                         ["endpoint", "method", "status"], buckets=_LATENCY_BUCKETS,
                                         registry=r)
        # (endpoint, method, status) -> the two children: bounded like the label values themselves
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.queue_wait = Histogram("vae_queue_duration_seconds",
                                    "Time a submission waited in the batch queue before its first rows ran",
                                    ["model", "version", "graph"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("vae_compute_duration_seconds", "Execution time of one batch on the device",
                                 ["model", "version", "graph"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("vae_batch_size_rows", "Rows per executed batch",
                                    ["model", "version", "graph"], buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("vae_queue_depth_rows", "Rows waiting in the batch queue",
                                 ["model", "version", "graph"], registry=r, multiprocess_mode="livesum")
        self.batch_failures = Counter("vae_batch_failures", "Batches that raised in the runtime",
                                      ["model", "version", "graph"], registry=r)
        self.rejections = Counter("vae_rejections",
                                  "Submissions refused (queue_full) or timed out (deadline)",
                                  ["model", "version", "graph", "reason"], registry=r)
        self.queue_peak = Gauge("vae_queue_depth_peak_rows", "Most rows ever waiting in the batch queue",
                                ["model", "version", "graph"], registry=r, multiprocess_mode="max")
        self.queue_limit = Gauge("vae_queue_limit_rows", "Queue bound in rows; admission refuses beyond it",
                                 ["model", "version", "graph"], registry=r, multiprocess_mode="max")
        self.inflight = Gauge("vae_inflight_requests", "Model requests being handled now (all HTTP workers)",
                              registry=r, multiprocess_mode="livesum")
        # The sum of each worker's peak: an upper bound of the true peak across workers.
        self.inflight_peak = Gauge("vae_inflight_requests_peak", "Most model requests handled at once "
                                   "(summed over HTTP workers)", registry=r, multiprocess_mode="sum")
        self.model_refused = Gauge("vae_model_refused", "1 when the model's artifact was refused at start-up",
                                   ["model", "version"], registry=r, multiprocess_mode="max")
        self.model_ready = Gauge("vae_model_ready", "1 when the model is loaded and warmed up",
                                 ["model", "version", "runtime", "device"], registry=r,
                                 multiprocess_mode="livemax")
        # Images scored and flagged per method, on every protocol: their ratio is the anomaly rate whose
        # jump is the usual sign of drift upstream (deploy/prometheus/alerts.yml).
        self.anomaly_scored = Counter("vae_anomaly_scored_images", "Images given an anomaly score",
                                      ["model", "version", "method"], registry=r)
        self.anomaly_flagged = Counter("vae_anomaly_flagged_images",
                                       "Images flagged as anomalous (p_value <= alpha)",
                                       ["model", "version", "method"], registry=r)

    def request_done(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request and its latency (the children of each label set are looked up
        once: labels() took a lock and built a key on every request)."""
        key = (endpoint, method, status)
        series = self._request_series.get(key)
        if series is None:
            labels = (endpoint, method, str(status))
            series = self._request_series[key] = (self.requests.labels(*labels),
                                                  self.request_latency.labels(*labels))
        series[0].inc()
        series[1].observe(seconds)

    def anomaly_results(self, model: str, version: str, method: str, flags: np.ndarray) -> None:
        """Count one request's anomaly decisions (flags: (N,) bool)."""
        self.anomaly_scored.labels(model, version, method).inc(len(flags))
        self.anomaly_flagged.labels(model, version, method).inc(int(np.count_nonzero(flags)))

    def observer(self, model: str, version: str, graph: str) -> BatcherMetrics:
        return BatcherMetrics(self, model, version, graph)

    def render(self) -> bytes:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=directory)
        return generate_latest(combined)


class BatcherMetrics:
    """The batching.BatchObserver of one (model, graph)."""

    def __init__(self, metrics: Metrics, model: str, version: str, graph: str) -> None:
        labels = {"model": model, "version": version, "graph": graph}
        self._queue_wait = metrics.queue_wait.labels(**labels)
        self._compute = metrics.compute.labels(**labels)
        self._rows = metrics.batch_rows.labels(**labels)
        self._depth = metrics.queue_depth.labels(**labels)
        self._peak = metrics.queue_peak.labels(**labels)
        self._limit = metrics.queue_limit.labels(**labels)
        self._peak_rows = 0
        self._failures = metrics.batch_failures.labels(**labels)
        self._rejections = metrics.rejections
        self._labels = labels

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def batch(self, rows: int, seconds: float) -> None:
        self._rows.observe(rows)
        self._compute.observe(seconds)

    def depth(self, rows: int) -> None:
        self._depth.set(rows)
        if rows > self._peak_rows:
            self._peak_rows = rows
            self._peak.set(rows)

    def limit(self, rows: int) -> None:
        self._limit.set(rows)

    def failure(self) -> None:
        self._failures.inc()

    def rejected(self, reason: str) -> None:
        self._rejections.labels(reason=reason, **self._labels).inc()
