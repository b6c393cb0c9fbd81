"""LitServe 0.2 peer: the encoder behind LitServe's batching (max batch 64, batch timeout 2 ms).

    BENCH_MODEL_DIR=models/mnist-vae/1 .bench-peers-venv/bin/python benchmarks/peers/litserve_server.py \
        --port 8002 --workers 1

POST /encode with `{"images": ["<base64 PNG>", ...]}` answers `{"results": [...]}` with mean,
variance and log_variance per image. LitServe batches requests, not images: one batch is up to 64
requests (each of 1 or 64 images); `batch` concatenates their images into one (N, 1, 28, 28) array
and `unbatch` splits the outputs back per request. Preprocessing runs in decode_request (in the
inference worker, as LitServe does). `--workers N` sets workers_per_device=N inference processes and
leaves num_api_servers at its default (None: as many API server processes as inference workers),
plus LitServe's main process.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Encoder


class EncoderAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.encoder = Encoder()

    def decode_request(self, request):  # no annotation: LitServe then passes the parsed JSON body
        # (with `from __future__ import annotations` a string annotation would become a query parameter)
        return np.stack([self.encoder.preprocess(s) for s in request["images"]])

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, batch: tuple[np.ndarray, list[int]] | np.ndarray) -> Any:
        if isinstance(batch, tuple):
            x, counts = batch
            return self.encoder.run(x), counts
        return self.encoder.run(batch)

    def unbatch(self, output: tuple[list[dict[str, Any]], list[int]]) -> list[list[dict[str, Any]]]:
        results, counts = output
        bounds = np.cumsum([0, *counts])
        return [results[a:b] for a, b in itertools.pairwise(bounds)]

    def encode_response(self, output):  # no annotation: LitServe uses it as the route's response type
        return {"results": output}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("BENCH_WORKERS", "1")),
        help="inference workers (workers_per_device); API servers follow LitServe's default",
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    args = parser.parse_args()
    api = EncoderAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/encode")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
