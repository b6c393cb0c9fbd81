"""BentoML 1.4 peer: the encoder behind BentoML's adaptive batching (max batch 64).

    BENCH_MODEL_DIR=models/mnist-vae/1 BENCH_WORKERS=1 \
        .bench-peers-venv/bin/bentoml serve benchmarks/peers/bentoml_service.py:VaeEncoder \
        --host 127.0.0.1 --port 3000

POST /encode with `{"images": ["<base64 PNG>", ...]}` answers a JSON list with mean, variance and
log_variance per image (BentoML returns the batchable API's list as the body: no `results` wrapper).
The API is batchable along the list: BentoML's dispatcher concatenates the `images` lists of concurrent
requests (up to max_batch_size rows, waiting adaptively up to max_latency_ms) into one call and splits
the answer back. Preprocessing runs inside the batched call. BENCH_WORKERS sets
`@bentoml.service(workers=N)`: N worker processes, each with its own HTTP server, session and batcher
(plus BentoML's supervisor process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Encoder

MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "64"))
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "60000"))  # BentoML's default


@bentoml.service(workers=int(os.environ.get("BENCH_WORKERS", "1")), traffic={"timeout": 60})
class VaeEncoder:
    def __init__(self) -> None:
        self.encoder = Encoder()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def encode(self, images: list[str]) -> list[dict[str, Any]]:
        return self.encoder.run(np.stack([self.encoder.preprocess(s) for s in images]))
