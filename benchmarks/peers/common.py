"""What both peers share: the ONNX session (one intra-op thread) and the preprocessing of plain_server.py.

Run by the peers' own venv (.bench-peers-venv), so it imports nothing from the project. Settings come
from the environment (the benchmark sets them): BENCH_MODEL_DIR (a version folder with manifest.json),
BENCH_THREADS (ONNX Runtime intra-op threads, default 1), BENCH_DEVICE (auto | cpu | cuda);
BENCH_LOG_BATCHES=1 writes one stderr line per batch with its rows (to check that batching happens).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

LOG_BATCHES = os.environ.get("BENCH_LOG_BATCHES") == "1"  # one stderr line per batch (for checks only)


class Encoder:
    """encoder.onnx of one model version: base64 PNGs in, (mean, variance, log_variance) per image out."""

    def __init__(
        self, version_dir: str | None = None, threads: int | None = None, device: str | None = None
    ) -> None:
        folder = Path(version_dir or os.environ.get("BENCH_MODEL_DIR", "models/mnist-vae/1"))
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.prep = self.manifest["preprocessing"]
        options = ort.SessionOptions()
        threads = int(os.environ.get("BENCH_THREADS", "1")) if threads is None else threads
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        device = device or os.environ.get("BENCH_DEVICE", "auto")
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        gpu = device == "cuda" or (device == "auto" and cuda and Path("/dev/nvidiactl").exists())
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(
            str(folder / self.manifest["graphs"]["encoder"]["onnx"]),
            sess_options=options,
            providers=providers,
        )
        self.providers = self.session.get_providers()
        # the benchmark reads this line from the server's log
        print(f"BENCH_PROVIDERS={','.join(self.providers)}", file=sys.stderr, flush=True)

    def preprocess(self, b64: str) -> np.ndarray:
        """Pillow: decode, to the manifest's colour mode (grey), resize to H x W if needed, / 255."""
        im = Image.open(io.BytesIO(base64.b64decode(b64))).convert(self.prep["color_mode"])
        if im.size != (self.prep["width"], self.prep["height"]):
            im = im.resize((self.prep["width"], self.prep["height"]), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def run(self, x: np.ndarray) -> list[dict[str, Any]]:
        """One session.run on an (N, C, H, W) batch; the service's answer per image."""
        if LOG_BATCHES:
            print(f"BENCH_BATCH rows={len(x)} t={time.monotonic():.4f}", file=sys.stderr, flush=True)
        x = np.ascontiguousarray(x, dtype=np.float32)
        mean, log_var = self.session.run(["mean", "log_var"], {"x": x})
        mean, log_var = mean.astype(np.float64), log_var.astype(np.float64)
        return [
            {"mean": m.tolist(), "variance": np.exp(lv).tolist(), "log_variance": lv.tolist()}
            for m, lv in zip(mean, log_var, strict=True)
        ]
