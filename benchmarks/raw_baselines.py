"""In-process runtime throughput: what the service could reach with no HTTP, parsing or queueing at all.

Sessions are built with the service's settings (intra-op threads = VAE_THREADS, 0 meaning ONNX
Runtime's default; one inter-op thread; the CUDA provider where the service would use it) on the
same real digits the HTTP clients send.
- encoder: batches of 64 images (the 64-image requests) and of 1 image (what batching-off runs);
- log_weights: batches of `rows` x `chunk` samples, the (B, chunk, D) shape the service forms for
  importance sampling (chunk = VAE_IW_CHUNK_SIZE, rows up to VAE_MAX_BATCH_SAMPLES / chunk), with the
  noise drawn beforehand: the decoder's throughput limit in samples/s, on one thread and on one thread
  per core at once (the machine's limit).
Each measurement is a tight loop of `session.run`, bounded by a time budget and an iteration cap;
every shape is run once untimed when first used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def providers(device: str) -> list[str]:
    """The ONNX Runtime providers the service picks for VAE_DEVICE (service/engine/runtime.py's rule)."""
    from service.engine.runtime import gpu_present

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" or (device == "auto" and cuda and gpu_present()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def time_runs(run: Callable[[], object], seconds: float, min_runs: int,
              max_runs: int = 100_000) -> tuple[int, float]:
    """(runs, seconds) of calling run() until the budget is spent (at least min_runs, at most max_runs)."""
    runs = 0
    started = time.perf_counter()
    while runs < max_runs and (runs < min_runs or time.perf_counter() - started < seconds):
        run()
        runs += 1
    return runs, time.perf_counter() - started


class RawRunner:
    """The encoder and log_weights sessions of one model version, and their inputs."""

    def __init__(self, encoder: Path, log_weights: Path, x: np.ndarray, *, threads: int, chunk: int,
                 latent_dim: int, device: str = "auto") -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        wanted = providers(device)
        self.encoder = ort.InferenceSession(str(encoder), sess_options=options, providers=wanted)
        self.log_weights = ort.InferenceSession(str(log_weights), sess_options=options, providers=wanted)
        self.providers = self.encoder.get_providers()
        self.x = x
        self.chunk = chunk
        self.latent_dim = latent_dim
        self._warm: set[tuple[str, int]] = set()

    def _warm_up(self, key: tuple[str, int], run: Callable[[], object]) -> None:
        if key not in self._warm:
            run()
            self._warm.add(key)

    def encoder_throughput(self, batch: int, seconds: float) -> dict[str, Any]:
        """images/s of the encoder at a fixed batch size, cycling through the digits."""
        starts = range(0, len(self.x) - batch + 1, batch)
        batches = [np.ascontiguousarray(self.x[i:i + batch]) for i in starts]
        state = {"i": 0}

        def run() -> None:
            self.encoder.run(None, {"x": batches[state["i"] % len(batches)]})
            state["i"] += 1

        self._warm_up(("encoder", batch), run)
        runs, elapsed = time_runs(run, seconds, min_runs=3)
        return {"batch": batch, "runs": runs, "seconds": round(elapsed, 3),
                "images_per_s": round(runs * batch / elapsed, 1),
                "ms_per_batch": round(1000 * elapsed / runs, 3)}

    def log_weights_throughput(self, rows: int, seconds: float, parallel: int = 1) -> dict[str, Any]:
        """samples/s of log_weights at batches of rows x chunk samples (x binarized as the service does),
        in `parallel` threads at once on the one session (ONNX Runtime releases the GIL while it runs):
        with one per core, what the whole machine computes at the session's intra-op threads."""
        xb = (np.resize(self.x, (rows, *self.x.shape[1:])) >= 0.5).astype(np.float32)
        eps = np.random.default_rng(0).standard_normal((rows, self.chunk, self.latent_dim), dtype=np.float32)

        def run() -> None:
            self.log_weights.run(None, {"x": xb, "eps": eps})

        self._warm_up(("log_weights", rows), run)
        with ThreadPoolExecutor(parallel) as pool:
            timed = list(pool.map(lambda _: time_runs(run, seconds, min_runs=2), range(parallel)))
        runs = sum(r for r, _ in timed)
        elapsed = max(e for _, e in timed)
        return {"rows": rows, "chunk": self.chunk, "samples_per_batch": rows * self.chunk, "runs": runs,
                "parallel": parallel, "seconds": round(elapsed, 3),
                "samples_per_s": round(runs * rows * self.chunk / elapsed, 1),
                "ms_per_batch": round(1000 * elapsed * parallel / runs, 2)}

    def full_pass(self, encode_batch: int, service_rows: int, seconds: float) -> dict[str, Any]:
        """Every raw figure: encoder at batch 1 and `encode_batch`; log_weights at 1, 8 and service rows."""
        return {
            "encoder": {str(b): self.encoder_throughput(b, seconds) for b in sorted({1, encode_batch})},
            "log_weights": {str(r): self.log_weights_throughput(r, seconds)
                            for r in sorted({1, 8, service_rows})},
        }
