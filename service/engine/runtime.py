"""Inference backends behind one interface: `run(graph, {input name: array}) -> {output name: array}`.

Runtimes are not thread-safe by contract: each is only ever called from its device's single
execution thread (see batching.DeviceExecutor), so there is never more than one batch in flight
per device and the device always sees the largest batches the queue could form.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.artifacts import ArtifactError, Manifest, read_verified

log = logging.getLogger(__name__)


class RuntimeUnavailable(RuntimeError):
    """The configured runtime or device cannot be used on this machine."""


class Runtime(Protocol):
    name: str  # "onnx" | "torchscript"
    device: str  # "cpu" | "cuda:0": models with the same device share one execution thread
    details: dict[str, Any]  # shown in model metadata (providers, threads, ...)

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def gpu_present() -> bool:
    """A cheap check that avoids asking CUDA libraries on machines that obviously have no NVIDIA GPU."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


class OnnxRuntime:
    """ONNX Runtime sessions for the three graphs of one model."""

    name = "onnx"

    def __init__(self, manifest: Manifest, device: str, threads: int) -> None:
        import onnxruntime as ort

        want_cuda = device == "cuda" or (
            device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present())
        providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda \
            else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # graphs are sequential; one batch runs at a time anyway
        options.log_severity_level = 3  # errors only: provider fallbacks are reported below instead
        self._sessions = {}
        self._outputs: dict[str, list[str]] = {}
        for graph, spec in manifest.graphs.items():
            path = manifest.graph_path(graph, "onnx")
            data = read_verified(manifest, graph, "onnx")  # checksummed bytes, not a path to re-open
            try:
                session = ort.InferenceSession(data, sess_options=options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own types for corrupt or unsupported files
                raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: "
                                    f"{str(exc).strip()[:300]})") from exc
            actual_inputs = sorted(i.name for i in session.get_inputs())
            if actual_inputs != sorted(spec.inputs):
                raise RuntimeUnavailable(f"{path}: inputs {actual_inputs} differ from the manifest's "
                                         f"{list(spec.inputs)}")
            self._sessions[graph] = session
            self._outputs[graph] = list(spec.outputs)
        active = self._sessions["encoder"].get_providers()
        if want_cuda and "CUDAExecutionProvider" not in active:
            if device == "cuda":
                raise RuntimeUnavailable("VAE_DEVICE=cuda but ONNX Runtime could not start its CUDA provider "
                                         "(check the CUDA/cuDNN libraries); use VAE_DEVICE=auto or cpu")
            log.warning("no usable CUDA provider; %s runs on CPU", manifest.name)
        self.device = "cuda:0" if "CUDAExecutionProvider" in active else "cpu"
        self.details = {"providers": active, "intra_op_threads": threads or "default"}

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._sessions[graph].run(self._outputs[graph], inputs)
        return dict(zip(self._outputs[graph], outputs, strict=True))


class TorchScriptRuntime:
    """Traced TorchScript modules (torch.jit.load: TorchScript's own archive reader, not torch.load)."""

    name = "torchscript"

    def __init__(self, manifest: Manifest, device: str, threads: int) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("VAE_DEVICE=cuda but torch sees no CUDA device; "
                                     "use VAE_DEVICE=auto or cpu")
        self._torch = torch
        self._device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        if threads and self._device.type == "cpu":
            torch.set_num_threads(threads)  # process-wide; the same value for every model
        self._modules = {}
        self._specs = manifest.graphs
        for graph in manifest.graphs:
            path = manifest.graph_path(graph, "torchscript")
            data = read_verified(manifest, graph, "torchscript")  # checksummed bytes from the models dir
            # TorchScript is deprecated upstream and warns on load; the traced files still run fine.
            # torch.jit.load reads TorchScript archives with its own restricted reader (no torch.load,
            # no arbitrary Python objects); the bytes were verified just above.
            try:
                with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                    warnings.simplefilter("ignore")
                    module = torch.jit.load(io.BytesIO(data), map_location=self._device)
            except Exception as exc:
                raise ArtifactError(f"{path}: TorchScript cannot load it ({type(exc).__name__}: "
                                    f"{str(exc).strip()[:300]})") from exc
            self._modules[graph] = module.eval()
        self.device = "cuda:0" if self._device.type == "cuda" else "cpu"
        self.details = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        spec = self._specs[graph]
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self._device) for n in spec.inputs]
            out = self._modules[graph](*args)
            outs = out if isinstance(out, tuple | list) else (out,)
            return {n: t.detach().cpu().numpy() for n, t in zip(spec.outputs, outs, strict=True)}


def load_runtime(manifest: Manifest, runtime: str, device: str, threads: int) -> Runtime:
    """The configured backend for one model."""
    if runtime == "onnx":
        return OnnxRuntime(manifest, device, threads)
    if runtime == "torchscript":
        return TorchScriptRuntime(manifest, device, threads)
    raise RuntimeUnavailable(f"unknown runtime {runtime!r}")
