"""Export artifacts as an NVIDIA Triton Inference Server model repository (`python -m training triton-repo`).

For every artifact `models/<name>/<version>/` the repository gets four Triton models (six with the
optional background graph), each a `config.pbtxt` plus `<version>/model.onnx` run by Triton's ONNX
Runtime backend:

    <name>_encoder, <name>_decoder, <name>_log_weights   the artifact's ONNX files, copied byte for byte
                                                         after their sha256 is checked against manifest.json
    <name>_log_likelihood                                log_weights.onnx plus a reduction over the
                                                         sample axis: log (1/K) sum_k exp(log_w_k) and
                                                         mean_k log_w_k (the ELBO)
    <name>_background_log_weights, <name>_background_log_likelihood
                                                         the same for the likelihood-ratio background
                                                         model, when the artifact has one

A VQ-VAE artifact (model.family "vqvae") gives <name>_encoder, _decoder, _prior, _prior_row,
_prior_step, _log_weights and _log_likelihood the same way. Sampling from its prior is a loop over code
positions: one <name>_prior_row call per grid row and one <name>_prior_step call per position, feeding
back the codes drawn and the activations cached so far (or, slower, one full <name>_prior pass per
position); Triton runs each call, the loop belongs to the client (docs/triton-and-kserve.md shows it).

The configs are `inference.ModelConfig` protobuf messages serialised with `text_format`, so they are
valid by construction; their inputs and outputs are read from the ONNX graphs themselves. Triton's
schema is `tritonclient/grpc/model_config_pb2.py`, loaded by file path because importing the
`tritonclient.grpc` package registers gRPC service symbols that clash with kserve's in one process.
Docs: docs/triton-and-kserve.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

# The artifact contract (format version, graph names, name rules) is defined once, in the service.
from service.artifacts import (
    FAMILY_GRAPHS,
    FAMILY_OPTIONAL_GRAPHS,
    FORMAT_VERSION,
    MODEL_NAME_RE,
    version_key,
)

# log_weights-like graph (x, eps [, y] -> log_w) -> the Triton model that reduces it over the samples
REDUCTIONS = {"log_weights": "log_likelihood", "background_log_weights": "background_log_likelihood"}
MIN_OPSET = 18  # Reduce* ops take their axes as an input from opset 18 on
# Triton ignores version folders that are not a number or start with 0, so only these can be exported.
TRITON_VERSION_RE = re.compile(r"[1-9][0-9]*")
SCHEMA_MODULE = "triton_model_config_pb2"
# text_format leaves out proto3 fields that hold their default value; the header says which matter.
CONFIG_HEADER = """\
# Written by `python -m training triton-repo` (vae-serve) from artifact versions {versions}.
# Fields at their protobuf default are not printed: default_queue_policy.timeout_action is REJECT.
"""

# ONNX element type -> Triton DataType enum name (model_config.proto).
ONNX_TO_TRITON = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.BOOL: "TYPE_BOOL",
}


class TritonRepoError(ValueError):
    """The repository could not be written; the message says why (the CLI prints it, exit status 2)."""


@dataclass(frozen=True)
class TritonOptions:
    """Scheduling settings written into every config.pbtxt (Triton's names; defaults mirror the service)."""

    instance_kind: Literal["gpu", "cpu"] = "gpu"
    instance_count: int = 1
    max_batch_size: int = 64  # rows (images / latents) per batch, like VAE_MAX_BATCH_SIZE
    max_queue_delay_us: int = 2000  # --max-queue-delay-us; the service itself defaults to 0 on CPU
    max_queue_size: int = 1024  # queued requests before Triton rejects (VAE_MAX_QUEUE_SIZE counts rows)
    timeout_us: int = 30_000_000  # queue timeout, like VAE_REQUEST_TIMEOUT_S = 30; 0 = none

    def __post_init__(self) -> None:
        if self.instance_kind not in ("gpu", "cpu"):
            raise TritonRepoError(f"instance kind must be gpu or cpu, not {self.instance_kind!r}")
        for field in ("instance_count", "max_batch_size", "max_queue_size"):
            if getattr(self, field) < 1:
                raise TritonRepoError(f"{field} must be at least 1")
        for field in ("max_queue_delay_us", "timeout_us"):
            if getattr(self, field) < 0:
                raise TritonRepoError(f"{field} must not be negative")


# -- Triton's schema ---------------------------------------------------------------------------------
def load_model_config_pb2() -> ModuleType:
    """Triton's `model_config_pb2` module, without importing the `tritonclient.grpc` package.

    `tritonclient.grpc/__init__` imports its gRPC service protos, whose `inference.*` symbols collide
    with kserve's copies in protobuf's global pool; model_config.proto alone does not.
    """
    loaded = sys.modules.get(SCHEMA_MODULE) or sys.modules.get("tritonclient.grpc.model_config_pb2")
    if loaded is not None:  # registering the same .proto twice is harmless, but there is no need
        return loaded
    hint = "install it with: pip install 'tritonclient[grpc]' (it is in vae-serve's test extra)"
    try:
        import tritonclient
    except ImportError as exc:
        raise TritonRepoError(f"the Triton export needs tritonclient's model_config schema; {hint}") from exc
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(SCHEMA_MODULE, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise TritonRepoError(f"tritonclient is installed without its gRPC schema ({path}); {hint}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:  # protobuf missing or too old: the [grpc] extra brings the right one
        raise TritonRepoError(f"cannot load Triton's model_config schema ({exc}); {hint}") from exc
    sys.modules[SCHEMA_MODULE] = module
    return module


# -- reading artifacts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedArtifact:
    """One artifact version whose graph bytes matched manifest.json."""

    name: str
    version: str
    manifest: dict[str, Any]
    onnx_bytes: dict[str, bytes]  # graph -> the verified bytes, which are what gets written


def select_artifacts(models_dir: Path, refs: list[str]) -> list[Path]:
    """Version folders for `name` (latest version) or `name:version` refs; no refs: every model's latest."""
    if not models_dir.is_dir():
        raise TritonRepoError(f"models directory {models_dir} does not exist")
    found: dict[str, list[str]] = {}
    model_dirs = sorted(p for p in models_dir.iterdir() if p.is_dir() and MODEL_NAME_RE.fullmatch(p.name))
    for model_dir in model_dirs:
        versions = [v.name for v in model_dir.iterdir()
                    if v.is_dir() and not v.name.startswith(".") and (v / "manifest.json").is_file()]
        if versions:
            found[model_dir.name] = versions
    chosen = []
    for ref in refs or sorted(found):
        name, _, version = ref.partition(":")
        if name not in found:
            raise TritonRepoError(f"model {name!r} not found in {models_dir} "
                                  f"(found: {sorted(found) or 'none'})")
        if version and version not in found[name]:
            raise TritonRepoError(f"model {name!r} has no version {version!r} (found: {sorted(found[name])})")
        chosen.append(models_dir / name / (version or max(found[name], key=version_key)))
    if not chosen:
        raise TritonRepoError(f"no models found in {models_dir}: expected <name>/<version>/manifest.json")
    return list(dict.fromkeys(chosen))  # a model named twice is exported once


def read_artifact(directory: Path) -> VerifiedArtifact:
    """Read manifest.json and the three ONNX graphs, refusing any whose sha256 differs from the manifest.

    The bytes are hashed as they are read and those very bytes are written to the repository, so a
    file swapped after the check is never copied.
    """
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TritonRepoError(f"{directory}: cannot read manifest.json: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TritonRepoError(f"{directory}: format_version {manifest.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}, the only one this exporter knows")
    name, version = str(manifest.get("name")), str(manifest.get("version"))
    if (name, version) != (directory.parent.name, directory.name):
        raise TritonRepoError(f"{directory}: manifest says {name}/{version}")
    if not TRITON_VERSION_RE.fullmatch(version):
        raise TritonRepoError(f"{directory}: Triton serves only versions that are positive integers without "
                              f"leading zeros; re-export this model with such a --version (not {version!r})")
    files = manifest.get("files", {})
    onnx_bytes = {}
    graphs = manifest.get("graphs")
    family = str((manifest.get("model") or {}).get("family", "gaussian"))
    if family not in FAMILY_GRAPHS:
        raise TritonRepoError(f"{directory}: model family {family!r} is unknown to this exporter")
    optional = [g for g in FAMILY_OPTIONAL_GRAPHS[family] if isinstance(graphs, dict) and g in graphs]
    for graph in (*FAMILY_GRAPHS[family], *optional):
        try:
            relative = str(manifest["graphs"][graph]["onnx"])
        except (KeyError, TypeError) as exc:
            raise TritonRepoError(f"{directory}: manifest.json names no ONNX file for the {graph} "
                                  "graph") from exc
        path = (directory / relative).resolve()
        if Path(relative).is_absolute() or not path.is_relative_to(directory.resolve()):
            raise TritonRepoError(f"{directory}: manifest.json lists a file outside the artifact: "
                                  f"{relative!r}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TritonRepoError(f"{directory}: cannot read {relative!r}: {exc}") from exc
        expected = str(files.get(relative, "")).lower()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise TritonRepoError(f"{directory}: sha256 of {relative!r} is {actual}, manifest says "
                                  f"{expected or 'nothing'}; the artifact is corrupt or was modified")
        onnx_bytes[graph] = data
    return VerifiedArtifact(name, version, manifest, onnx_bytes)


# -- the log-likelihood graph ---------------------------------------------------------------------------
def log_likelihood_graph(log_weights: onnx.ModelProto) -> onnx.ModelProto:
    """log_weights (x, eps [, y] -> log_w (B, K); a VQ-VAE's takes uniforms u instead of eps) extended to
    log_likelihood (B,) and elbo (B,).

    log_likelihood = max_k log_w + log sum_k exp(log_w_k - max_k log_w) - log K: the importance-weighted
    bound, with the max shifted out explicitly rather than left to ReduceLogSumExp, whose ONNX
    definition is the naive log(sum(exp(x))) that underflows to -inf for log_w below about -104 in
    float32 (a runtime or execution provider is free to implement it that way). K is read from
    the shape of the noise input at run time. elbo = mean_k log_w. All in float32: see
    docs/triton-and-kserve.md.
    """
    opset = max((o.version for o in log_weights.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise TritonRepoError(f"log_weights graph has opset {opset}; the reduction needs >= {MIN_OPSET}")
    model = onnx.ModelProto()
    model.CopyFrom(log_weights)
    graph = model.graph
    noise = next((n for n in ("eps", "u") if n in {i.name for i in graph.input}), None)
    if len(graph.output) != 1 or noise is None:
        raise TritonRepoError("log_weights graph must have a noise input ('eps' of the Gaussian family, 'u' "
                              "of the VQ-VAE) and exactly one output (log_w)")
    log_w = graph.output[0].name
    taken = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    taken |= {name for node in graph.node for name in [*node.input, *node.output]}
    clash = sorted(n for n in taken if n.startswith("iw_") or n in ("log_likelihood", "elbo"))
    if clash:
        raise TritonRepoError(f"log_weights graph already uses the names {clash}")

    sample_axis = np.array([1], dtype=np.int64)
    graph.initializer.append(numpy_helper.from_array(sample_axis, "iw_axes"))
    graph.node.extend([
        helper.make_node("ReduceMax", [log_w, "iw_axes"], ["iw_max"], name="iw_max", keepdims=1),
        helper.make_node("Sub", [log_w, "iw_max"], ["iw_shifted"], name="iw_shift"),  # <= 0
        helper.make_node("Exp", ["iw_shifted"], ["iw_exp"], name="iw_exp"),  # in (0, 1], the max is 1
        helper.make_node("ReduceSum", ["iw_exp", "iw_axes"], ["iw_sum"], name="iw_sum", keepdims=0),
        helper.make_node("Log", ["iw_sum"], ["iw_log_sum"], name="iw_log_sum"),
        helper.make_node("Squeeze", ["iw_max", "iw_axes"], ["iw_max_row"], name="iw_max_row"),
        helper.make_node("Add", ["iw_log_sum", "iw_max_row"], ["iw_lse"], name="iw_lse"),
        helper.make_node("Shape", [noise], ["iw_k"], name="iw_k", start=1, end=2),  # (1,) int64: K
        helper.make_node("Cast", ["iw_k"], ["iw_k_float"], name="iw_k_float", to=TensorProto.FLOAT),
        helper.make_node("Log", ["iw_k_float"], ["iw_log_k"], name="iw_log_k"),
        helper.make_node("Sub", ["iw_lse", "iw_log_k"], ["log_likelihood"], name="iw_log_likelihood"),
        helper.make_node("ReduceMean", [log_w, "iw_axes"], ["elbo"], name="iw_elbo", keepdims=0),
    ])
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or batch.dim_value or None
    del graph.output[:]
    for name in ("log_likelihood", "elbo"):
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch_dim]))
    del graph.value_info[:]  # stale shape annotations of the old output; the checker re-infers them
    supplied = ("eps ~ N(0, I) of shape (B, K, D)" if noise == "eps"
                else "u ~ U[0, 1) of shape (B, K, h*w), one uniform per sample and code position")
    model.doc_string = ("Importance-weighted log-likelihood log (1/K) sum_k exp(log_w_k) and ELBO "
                        f"mean_k log_w_k per row; the caller supplies {supplied}.")
    onnx.checker.check_model(model, full_check=True)
    return model


# -- config.pbtxt ------------------------------------------------------------------------------------------
def _tensor_spec(value: onnx.ValueInfoProto, graph_name: str) -> tuple[str, list[int]]:
    """(Triton data type, dims without the batch dimension; -1 where the ONNX dim is not fixed)."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in ONNX_TO_TRITON:
        raise TritonRepoError(f"{graph_name}: {value.name} has ONNX type "
                              f"{TensorProto.DataType.Name(tensor.elem_type)}, which has no Triton type here")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise TritonRepoError(f"{graph_name}: {value.name} needs a dynamic first (batch) dimension for "
                              f"Triton's batching, its shape is {dims}")
    return ONNX_TO_TRITON[tensor.elem_type], dims[1:]


def _add_tensor(message: Any, value: onnx.ValueInfoProto, graph_name: str, pb2: ModuleType) -> None:
    data_type, dims = _tensor_spec(value, graph_name)
    message.name = value.name
    message.data_type = pb2.DataType.Value(data_type)
    if dims:
        message.dims.extend(dims)
    else:
        # A (B,) tensor, e.g. the class index y or log_likelihood: Triton needs non-empty dims, so the
        # documented form is dims [1] reshaped to [] (the caller sends (B, 1), the graph sees (B,)).
        message.dims.append(1)
        message.reshape.SetInParent()


def model_config(pb2: ModuleType, name: str, model: onnx.ModelProto, versions: list[int],
                 options: TritonOptions) -> Any:
    """The `inference.ModelConfig` of one ONNX graph, its I/O read from the graph itself."""
    config = pb2.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=options.max_batch_size)
    # Exactly the exported versions: nothing dropped into the folder later is served by accident.
    config.version_policy.specific.versions.extend(sorted(versions))
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializers:  # old IRs list initializers as inputs too
            _add_tensor(config.input.add(), value, name, pb2)
    for value in model.graph.output:
        _add_tensor(config.output.add(), value, name, pb2)
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = options.max_queue_delay_us
    policy = batching.default_queue_policy
    policy.timeout_action = pb2.ModelQueuePolicy.REJECT  # a late request fails fast, like the service's 504
    policy.default_timeout_microseconds = options.timeout_us
    policy.allow_timeout_override = True  # callers may ask for a shorter deadline per request
    policy.max_queue_size = options.max_queue_size
    group = config.instance_group.add()
    group.kind = (pb2.ModelInstanceGroup.KIND_GPU if options.instance_kind == "gpu"
                  else pb2.ModelInstanceGroup.KIND_CPU)
    group.count = options.instance_count
    return config


# -- the repository -------------------------------------------------------------------------------------
def _triton_models(artifact: VerifiedArtifact) -> dict[str, bytes]:
    """Triton model name -> model.onnx bytes for one artifact."""
    models = {f"{artifact.name}_{graph}": data for graph, data in artifact.onnx_bytes.items()}
    for graph, reduced in REDUCTIONS.items():
        if graph not in artifact.onnx_bytes:  # background_log_weights is optional
            continue
        reduction = log_likelihood_graph(onnx.load_from_string(artifact.onnx_bytes[graph]))
        digest = hashlib.sha256(artifact.onnx_bytes[graph]).hexdigest()
        source = f"{artifact.name}/{artifact.version}/{artifact.manifest['graphs'][graph]['onnx']}"
        helper.set_model_props(reduction, {"vae_serve.source": source, "vae_serve.source_sha256": digest})
        models[f"{artifact.name}_{reduced}"] = reduction.SerializeToString()
    return models


def export_triton_repo(models_dir: Path, out: Path, refs: list[str] | None = None,
                       options: TritonOptions | None = None, force: bool = False) -> list[str]:
    """Write a Triton model repository to `out` (atomically); returns the Triton model names written."""
    options = options or TritonOptions()
    pb2 = load_model_config_pb2()
    out = Path(out)
    source = Path(models_dir).resolve()
    if out.resolve() == source or out.resolve() in source.parents or source in out.resolve().parents:
        # --force replaces OUT: it must never be (or hold, or sit inside) the artifacts it is made from
        raise TritonRepoError(f"--out {out} overlaps the models directory {models_dir}; choose another")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise TritonRepoError(f"{out} exists and is not empty; pass --force to replace it")

    # name -> version -> model.onnx bytes; configs are built per name from every version's graph.
    repo: dict[str, dict[int, bytes]] = {}
    for directory in select_artifacts(Path(models_dir), refs or []):
        artifact = read_artifact(directory)
        for triton_name, data in _triton_models(artifact).items():
            repo.setdefault(triton_name, {})[int(artifact.version)] = data

    configs = {}
    for triton_name, versions in repo.items():
        texts = set()
        for data in versions.values():
            model = onnx.load_from_string(data)
            config = model_config(pb2, triton_name, model, list(versions), options)
            texts.add(text_format.MessageToString(config))
        if len(texts) != 1:  # one config.pbtxt describes every version of a Triton model
            raise TritonRepoError(f"versions {sorted(versions)} of {triton_name} have different inputs or "
                                  "outputs; export them to separate repositories")
        header = CONFIG_HEADER.format(versions=", ".join(map(str, sorted(versions))))
        configs[triton_name] = header + texts.pop()

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for triton_name, versions in repo.items():
            (tmp / triton_name / "config.pbtxt").parent.mkdir()
            (tmp / triton_name / "config.pbtxt").write_text(configs[triton_name])
            for version, data in versions.items():
                (tmp / triton_name / str(version)).mkdir()
                (tmp / triton_name / str(version) / "model.onnx").write_bytes(data)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(repo)
