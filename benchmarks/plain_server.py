"""Baseline for the load benchmark: the plain FastAPI endpoint a reasonable engineer would write first.

    .venv/bin/python benchmarks/plain_server.py --models-dir models --model mnist-vae --port 8001
    .venv/bin/python benchmarks/plain_server.py --threads 1 --workers 2   # uvicorn's multi-process mode

It serves the same encoder.onnx with ONNX Runtime, one `session.run` per request, no batching:
- `def` endpoints, so FastAPI runs each request in its thread pool (40 threads by default) and the
  event loop never blocks; ONNX Runtime releases the GIL and its sessions may be called from several
  threads at once, so requests run concurrently (each with the same intra-op thread setting as the
  service: 0 = ONNX Runtime's default; the CUDA provider where the service would use it);
- images decoded with Pillow the way the manifest says (grey or RGB, resized to H x W, / 255);
- the same answer as the service's encode (mean, variance, log_variance per image);
- uvicorn with its defaults (access log included; the service writes one log line per request too).
No auth, limits, metrics or artifact verification: that is what makes it the plain baseline.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from pydantic import BaseModel


class JsonImages(BaseModel):
    images: list[str] | None = None  # base64 image files
    inputs: list[list[list[list[float]]]] | None = None  # C x H x W arrays in [0, 1]


def create_app(version_dir: Path, threads: int, device: str) -> FastAPI:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    prep = manifest["preprocessing"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    gpu = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers()
                               and Path("/dev/nvidiactl").exists())
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(version_dir / manifest["graphs"]["encoder"]["onnx"]),
                                   sess_options=options, providers=providers)
    app = FastAPI(title="plain encoder baseline")
    app.state.providers = session.get_providers()

    def preprocess(data: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(data)).convert(prep["color_mode"])
        if im.size != (prep["width"], prep["height"]):
            im = im.resize((prep["width"], prep["height"]), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def encode(x: np.ndarray) -> dict[str, Any]:
        mean, log_var = session.run(["mean", "log_var"], {"x": x.astype(np.float32)})
        results = [{"mean": m.tolist(), "variance": np.exp(lv).tolist(), "log_variance": lv.tolist()}
                   for m, lv in zip(mean.astype(np.float64), log_var.astype(np.float64), strict=True)]
        return {"model": manifest["name"], "version": manifest["version"], "results": results}

    @app.get("/healthz")
    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/models/{model}/encode")
    def encode_files(model: str, images: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        return encode(np.stack([preprocess(f.file.read()) for f in images]))

    @app.post("/v1/models/{model}/encode-json")
    def encode_json(model: str, body: JsonImages) -> dict[str, Any]:
        if body.inputs is not None:
            return encode(np.asarray(body.inputs, dtype=np.float32))
        return encode(np.stack([preprocess(base64.b64decode(s)) for s in body.images or []]))

    return app


def app_from_env() -> FastAPI:
    """The app of `--workers N` (N > 1): uvicorn imports it in each worker process, settings from env."""
    import os

    app = create_app(Path(os.environ["PLAIN_VERSION_DIR"]), int(os.environ["PLAIN_THREADS"]),
                     os.environ["PLAIN_DEVICE"])
    print(f"BENCH_PROVIDERS={','.join(app.state.providers)}", flush=True)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="mnist-vae")
    parser.add_argument("--version", help="default: the highest numeric version")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="CUDA when a GPU and the CUDA provider exist (auto), as the service does")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (> 1: uvicorn's multi-process mode, one session each)")
    args = parser.parse_args()
    model_dir = args.models_dir / args.model
    version = args.version or max((p.name for p in model_dir.iterdir() if p.name.isdigit()), key=int)
    if args.workers > 1:
        import os

        os.environ.update(PLAIN_VERSION_DIR=str((model_dir / version).resolve()),
                          PLAIN_THREADS=str(args.threads), PLAIN_DEVICE=args.device)
        uvicorn.run("plain_server:app_from_env", factory=True, workers=args.workers, host=args.host,
                    port=args.port, app_dir=str(Path(__file__).resolve().parent))
        return
    app = create_app(model_dir / version, args.threads, args.device)
    print(f"BENCH_PROVIDERS={','.join(app.state.providers)}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
