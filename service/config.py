"""Service settings: one object built from `VAE_*` environment variables, validated at start-up.

Every limit that protects the process (queue sizes, upload sizes, k, n) lives here so an operator
can see them in one place; validators refuse combinations that could never serve a valid request.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.anomaly import METHODS
from service.artifacts import MODEL_NAME_RE


def _split_commas(value: object) -> object:
    """Lists come from the environment as comma-separated strings (`VAE_MODELS=a,b`)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All configuration; environment variables are the upper-case field names with the prefix `VAE_`."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore", frozen=True)

    # -- what to serve ----------------------------------------------------------------------------
    models_dir: Path = Path("models")  # relative to the working directory, like the Makefile assumes
    # Names to load, each `name` (latest version) or `name:version`; empty = every model found.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # With no `name:version` refs: serve every version found (the highest is the default of its name),
    # or only the highest one of each model.
    serve_all_versions: bool = True
    # Look for new and removed model versions every this many seconds (0: only on SIGHUP).
    model_poll_s: float = Field(0.0, ge=0.0)
    runtime: Literal["onnx", "torchscript"] = "onnx"  # ONNX Runtime has no Python-side overhead per op
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when a GPU and the CUDA provider exist
    # Execution threads per device (Triton's instance count), each running its own batches. 0 = auto:
    # 1 on a GPU; on the CPU as many as the cores hold at the intra-op threads each (2 on 2 cores at
    # 1 thread): measured on 2 cores, 64-image requests +45-50% over 1 instance, 1-image requests the
    # same; time-sliced log-likelihood work leaves one instance to cheap requests, and takes it too
    # once none has been in flight for a second (engine/batching.py). With engines
    # per worker (engine_placement) each worker gets that many, and the OS shares the cores among them:
    # measured on 2 cores, 1-image encodes under a log-likelihood flood keep 0.67x of their throughput
    # alone with 2 per worker, 0.35x with 1.
    device_instances: int = Field(0, ge=0, le=64)
    # Intra-op threads per runtime. 0 = auto: 1 on the CPU when other processes (HTTP workers) or other
    # instances share its cores (+15-20% measured here), else the runtime's default (all cores).
    threads: int = Field(0, ge=0)
    warmup: bool = True  # run every graph at the batch sizes used before reporting ready
    # A model whose artifact fails verification or loading: `fail` refuses to start (exit status 3),
    # `skip` logs the refusal, serves the other models, and stays not-ready only if none is left.
    on_bad_model: Literal["fail", "skip"] = "fail"

    # -- processes ------------------------------------------------------------------------------------
    # HTTP worker processes (parsing, decoding, validation, serialisation; per engine_placement also the
    # models). -1: one per CPU core, at most 8; 0: a single process doing everything.
    http_workers: int = Field(-1, ge=-1, le=64)
    # Where the models run when there are HTTP workers. `shared`: one inference process that every
    # worker calls (rows of all workers share batches, one copy of the models; the choice for a GPU).
    # `per-worker`: each HTTP worker loads the models and batches its own requests, with no hop to
    # another process (the choice for the CPU, where each worker has cores of its own anyway: on 2 cores
    # 1-image encodes 1.24x (64 connections) to 1.7x (1 connection) the requests/s of `shared`, and
    # log-likelihood 2.1x, for one copy of the models per worker; docs/benchmarks.md). `auto`:
    # per-worker when the models run on the CPU (VAE_DEVICE=cpu, or auto without an NVIDIA GPU).
    engine_placement: Literal["auto", "shared", "per-worker"] = "auto"
    # How connections reach the HTTP workers. true: each worker listens on a socket of its own on the
    # port (SO_REUSEPORT) and the kernel spreads new connections over them by address hash. false: one
    # listening socket the workers share, accepted by whichever wakes first, so a burst of connections
    # can all land on one worker (4 of 19 benchmark repeats at 8 keep-alive connections: one core idle,
    # 20-50 % fewer requests/s than the other repeats of the run). The cost of true: connections queued
    # for a worker that crashes before accepting them are reset. Linux only (elsewhere SO_REUSEPORT does
    # not balance): ignored there.
    reuse_port: bool = True

    # -- dynamic batching (Triton's names) -------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, le=65536)  # rows (images or latents) per encoder/decoder batch
    # How long a row may wait for company when the device is idle. 0 (Triton's default too): a batch is
    # whatever arrived while the device ran the previous one, so a lone request never waits, and under
    # load batches still fill (measured on 2 cores: 1-image encode at 1 / 8 connections 2.2x / 1.4x the
    # requests/s of a 2 ms delay, the same at 64).
    max_queue_delay_ms: float = Field(0.0, ge=0.0, le=10_000.0)
    max_queue_size: int = Field(1024, ge=1)  # queued rows per encoder/decoder batcher before 429
    request_timeout_s: float = Field(30.0, gt=0.0)  # deadline per request; past it: 504
    # (a caller may ask for a shorter one with the header `X-Request-Timeout: <seconds>`)
    # Admission by memory, per HTTP worker (api/memory_budget.py): bytes of the bodies and pixels of the
    # images of the requests being handled; past them: 429. Time is the engine's admission (deadlines).
    max_inflight_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_inflight_pixels: int = Field(64_000_000, ge=1)
    # A backstop on the count of model requests being handled at once per worker (429 before the body is
    # read): bursts of cheap requests are admitted by cost and memory, not refused by count.
    max_inflight_requests: int = Field(4096, ge=1)
    # Importance sampling is done in chunks of this many samples so rows of different requests (and
    # different k) stack into one (B, K, D) batch; the last chunk is padded and the padding dropped.
    iw_chunk_size: int = Field(128, ge=1, le=65536)
    max_batch_samples: int = Field(8192, ge=1)  # log_weights batch limit in samples (rows * chunk)
    max_queue_samples: int = Field(1_048_576, ge=1)  # log_weights queue bound in samples before 429
    # Time slice of one log_weights batch on the device (rows are capped to fit at the measured cost),
    # so encode/decode batches never wait behind more than this much log-likelihood work. 0: no cap.
    log_weights_slice_ms: float = Field(50.0, ge=0.0, le=60_000.0)
    # Deadline-aware admission: a request is admitted only if the estimated time until its work is
    # done fits in this share of the time left before its deadline (the rest absorbs estimate error).
    admission_share: float = Field(0.8, gt=0.0, le=1.0)

    # -- request limits ------------------------------------------------------------------------------
    default_k: int = Field(256, ge=1)  # log-likelihood samples when the caller gives none
    max_k: int = Field(5000, ge=1)
    max_n: int = Field(256, ge=1)  # samples per /sample call
    max_images: int = Field(64, ge=1)  # images (or latents) per request
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # request body, checked while streaming
    # A body must arrive within body_timeout_s plus its length at min_upload_bytes_per_s, else 408:
    # stalled or trickled uploads cannot hold a connection (and its memory) for long.
    body_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    min_upload_bytes_per_s: int = Field(256 * 1024, ge=1)
    # A request's line and headers must arrive within header_timeout_s of its first byte (a connection's
    # first request: of the connection opening), else 408; a connection that sends nothing in that time
    # is closed: slowloris callers, who trickle headers or open connections and send nothing, cannot
    # hold connections for long.
    header_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    # Send a response's head and body, which uvicorn writes separately, in one send() once the response
    # is complete (service/api/http_protocol.py LingeringTransport). Off only to measure what it buys.
    coalesce_writes: bool = True
    max_image_pixels: int = Field(16_000_000, ge=1)  # declared width*height, checked before decoding
    # Declared pixels of all images of one request, checked from the headers before decoding: bounds
    # the decode time one request can cost (about 1 s per 20M pixels of PNG on one core here).
    max_request_pixels: int = Field(16_000_000, ge=1)
    decode_threads: int = Field(1, ge=1, le=64)  # per HTTP worker: the pool that decodes large images
    # Models with per-method calibration (manifest `anomaly`): the default method (one of
    # service.anomaly.METHODS; a model not calibrated for it keeps its own default, logged at start-up)
    # and level alpha (else the manifest's); callers may override both per request.
    anomaly_method: str | None = None
    anomaly_alpha: float | None = Field(None, gt=0.0, lt=1.0)

    # -- security and operations -------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # empty: no auth
    auth_ops: bool = False  # with api_keys: also require the key on /healthz, /readyz and /metrics
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    json_logs: bool = False
    drain_timeout_s: float = Field(30.0, ge=0.0)  # how long in-flight requests may take after SIGTERM
    # After SIGTERM, keep accepting connections this long (readyz 503, /v1 503) so load balancers see
    # the replica leave before its port closes; then stop listening and drain.
    drain_delay_s: float = Field(0.0, ge=0.0, le=300.0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists_from_commas(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("models")
    @classmethod
    def _valid_model_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            name, _, version = ref.partition(":")
            if not MODEL_NAME_RE.fullmatch(name) or (version and not MODEL_NAME_RE.fullmatch(version)):
                raise ValueError(f"model reference {ref!r} must look like 'name' or 'name:version' "
                                 f"with names matching {MODEL_NAME_RE.pattern}")
        return value

    @field_validator("anomaly_method")
    @classmethod
    def _known_anomaly_method(cls, value: str | None) -> str | None:
        # A misspelt method would otherwise go unnoticed: every model would silently keep its own default.
        if value is not None and value not in METHODS:
            raise ValueError(f"unknown anomaly method {value!r}; valid methods: {', '.join(METHODS)}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(key.get_secret_value()) < 16 for key in value):
            raise ValueError("every API key must be at least 16 characters long")
        return value

    @model_validator(mode="after")
    def _consistent_limits(self) -> Settings:
        """Refuse settings under which a request within the per-request limits could never be served."""
        problems = []
        if self.default_k > self.max_k:
            problems.append(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        if self.max_batch_samples < self.iw_chunk_size:
            problems.append(f"max_batch_samples ({self.max_batch_samples}) must be at least "
                            f"iw_chunk_size ({self.iw_chunk_size})")
        if self.max_images > self.max_queue_size:
            problems.append(f"max_images ({self.max_images}) exceeds max_queue_size ({self.max_queue_size})")
        if self.max_n > self.max_queue_size:
            problems.append(f"max_n ({self.max_n}) exceeds max_queue_size ({self.max_queue_size})")
        if self.max_upload_bytes > self.max_inflight_bytes:
            problems.append(f"max_upload_bytes ({self.max_upload_bytes}) exceeds max_inflight_bytes "
                            f"({self.max_inflight_bytes}): the largest body could never be admitted")
        if self.max_request_pixels > self.max_inflight_pixels:
            problems.append(f"max_request_pixels ({self.max_request_pixels}) exceeds max_inflight_pixels "
                            f"({self.max_inflight_pixels}): the largest request could never be decoded")
        largest = self.max_images * math.ceil(self.max_k / self.iw_chunk_size) * self.iw_chunk_size
        if largest > self.max_queue_samples:
            problems.append(f"a request of max_images x max_k needs {largest} queued samples but "
                            f"max_queue_samples is {self.max_queue_samples}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def worker_processes(self) -> int:
        """HTTP worker processes to start (0: single-process mode)."""
        if self.http_workers >= 0:
            return self.http_workers
        return max(1, min(8, len(os.sched_getaffinity(0))))

    @property
    def listen_per_worker(self) -> bool:
        """Whether each HTTP worker listens on a socket of its own (reuse_port, where it balances)."""
        return self.reuse_port and self.worker_processes > 0 and sys.platform == "linux" \
            and hasattr(socket, "SO_REUSEPORT")

    @property
    def engine_per_worker(self) -> bool:
        """Whether each HTTP worker runs the models itself (no inference process; see engine_placement)."""
        if self.worker_processes == 0 or self.engine_placement == "shared":
            return False
        if self.engine_placement == "per-worker":
            return True
        from service.engine.runtime import gpu_present  # cheap: looks for the NVIDIA device files

        return self.device == "cpu" or (self.device == "auto" and not gpu_present())

    @property
    def cpu_intra_op_threads(self) -> int:
        """The intra-op threads to give a runtime (0: its default)."""
        if self.threads:
            return self.threads
        return 1 if self.device_instances > 1 or self.worker_processes > 0 else 0

    def instances_on(self, device: str) -> int:
        """Execution threads for `device` ("cpu" or "cuda:0"): VAE_DEVICE_INSTANCES, or its auto value."""
        if self.device_instances:
            return self.device_instances
        threads = self.cpu_intra_op_threads
        if device != "cpu" or threads == 0:  # a GPU, or one runtime that uses every core itself
            return 1
        return max(1, len(os.sched_getaffinity(0)) // threads)

    def default_anomaly_method(self, offered: Collection[str], own_default: str) -> str:
        """The method of anomaly requests that name none, for a model calibrated for `offered` methods:
        VAE_ANOMALY_METHOD when the model offers it, else the model's own `anomaly.default_method`."""
        return self.anomaly_method if self.anomaly_method in offered else own_default

    @property
    def log_weights_batch_rows(self) -> int:
        """Rows (image x chunk) per log_weights batch: the sample budget divided by the chunk size."""
        return max(1, self.max_batch_samples // self.iw_chunk_size)

    @property
    def log_weights_queue_rows(self) -> int:
        return max(1, self.max_queue_samples // self.iw_chunk_size)
