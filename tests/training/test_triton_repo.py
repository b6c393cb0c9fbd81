"""`python -m training triton-repo`: a Triton model repository whose configs match the ONNX graphs.

Every config.pbtxt is parsed back with Triton's own schema (tritonclient's model_config_pb2, loaded
by file path: importing the tritonclient.grpc package next to kserve breaks protobuf's symbol pool)
and compared field by field with the graph it describes, read independently with onnx. The
log_likelihood graph is checked numerically against onnxruntime on log_weights plus a float64
log-sum-exp in numpy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient
from google.protobuf import text_format

from training.__main__ import main
from training.pixelcnn import sample_rows, separable_draws
from training.triton_repo import TritonOptions, TritonRepoError, export_triton_repo

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "mnist-vae" / "1"
GRAPHS = ("encoder", "decoder", "log_weights", "log_likelihood")
# reduction model -> the log_weights-like graph it is built from
SOURCES = {"log_likelihood": "log_weights", "background_log_likelihood": "background_log_weights"}
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def pb2() -> ModuleType:
    """Triton's schema module, loaded independently of the code under test."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("test_triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_artifact(source: Path, target: Path, version: str | None = None) -> Path:
    """manifest.json and the ONNX files of an artifact (all the exporter reads), optionally re-versioned."""
    target.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    for graph in ("encoder", "decoder", "log_weights"):
        shutil.copyfile(source / f"{graph}.onnx", target / f"{graph}.onnx")
    if version is not None:
        manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository of the committed default model, written through the command line."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["triton-repo", "--models-dir", str(REPO_ROOT / "models"), "--out", str(out),
                 "--models", "mnist-vae:1"]) == 0
    return out


@pytest.fixture(scope="module")
def conditional_repo(artifacts: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny conditional model of tests/conftest.py (inputs x and y), with CPU instances."""
    out = tmp_path_factory.mktemp("triton-c") / "repo"
    options = TritonOptions(instance_kind="cpu", max_batch_size=8, max_queue_delay_us=100,
                            max_queue_size=16, timeout_us=5_000)
    assert export_triton_repo(artifacts.models_dir, out, ["tinyc"], options) == [
        f"tinyc_{graph}" for graph in sorted(GRAPHS)]
    return out


def _parse(pb2: ModuleType, path: Path) -> Any:  # a ModelConfig message (its class is made at run time)
    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def _expected_io(values: list[onnx.ValueInfoProto]) -> list[tuple[str, str, list[int], bool]]:
    """(name, Triton type, dims without batch, reshaped to []) as Triton's ONNX backend wants them."""
    expected = []
    for value in values:
        shape = value.type.tensor_type.shape.dim
        assert not shape[0].HasField("dim_value"), f"{value.name}: the batch dimension must be dynamic"
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in shape[1:]]
        # (B,) tensors are declared as dims [1] with an empty reshape: Triton refuses empty dims.
        expected.append((value.name, ONNX_TYPES[value.type.tensor_type.elem_type], dims or [1], not dims))
    return expected


def _actual_io(pb2: ModuleType, tensors: Any) -> list[tuple[str, str, list[int], bool]]:
    return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims),
             t.HasField("reshape") and not t.reshape.shape) for t in tensors]


def _check_repo(pb2: ModuleType, repo: Path, artifact: Path, kind: str, max_batch_size: int,
                delay_us: int, queue_size: int, timeout_us: int) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    name, version = manifest["name"], manifest["version"]
    graphs = [*GRAPHS]
    if "background_log_weights" in manifest["graphs"]:
        graphs += ["background_log_weights", "background_log_likelihood"]
    assert sorted(p.name for p in repo.iterdir()) == sorted(f"{name}_{g}" for g in graphs)
    for graph in graphs:
        model_dir = repo / f"{name}_{graph}"
        assert sorted(p.name for p in model_dir.iterdir()) == [version, "config.pbtxt"]
        onnx_path = model_dir / version / "model.onnx"
        if graph not in SOURCES:  # copied byte for byte, the checksum the manifest promises
            digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
            assert digest == manifest["files"][manifest["graphs"][graph]["onnx"]]
        model = onnx.load(onnx_path)
        onnx.checker.check_model(model)

        config = _parse(pb2, model_dir / "config.pbtxt")
        assert config.name == model_dir.name
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == max_batch_size
        assert list(config.version_policy.specific.versions) == [int(version)]
        assert _actual_io(pb2, config.input) == _expected_io(list(model.graph.input))
        assert _actual_io(pb2, config.output) == _expected_io(list(model.graph.output))
        source = SOURCES.get(graph, graph)
        assert [t.name for t in config.input] == manifest["graphs"][source]["inputs"]
        batching = config.dynamic_batching
        assert batching.max_queue_delay_microseconds == delay_us
        policy = batching.default_queue_policy
        assert policy.timeout_action == pb2.ModelQueuePolicy.REJECT
        assert policy.default_timeout_microseconds == timeout_us
        assert policy.allow_timeout_override
        assert policy.max_queue_size == queue_size
        assert [(pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group] == [
            (kind, 1)]


def test_default_model_repository_matches_its_onnx_graphs(pb2: ModuleType, default_repo: Path) -> None:
    _check_repo(pb2, default_repo, DEFAULT_MODEL, "KIND_GPU", 64, 2000, 1024, 30_000_000)
    config = _parse(pb2, default_repo / "mnist-vae_log_likelihood" / "config.pbtxt")
    # the numbers that matter, spelled out: x is (B, 1, 28, 28), eps (B, K, 32) with K dynamic
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [1, 28, 28]), ("eps", [-1, 32])]
    assert [t.name for t in config.output] == ["log_likelihood", "elbo"]
    assert "timeout_action is REJECT" in (default_repo / "mnist-vae_encoder" / "config.pbtxt").read_text()


def test_conditional_model_declares_its_label_input(pb2: ModuleType, conditional_repo: Path,
                                                    artifacts: Any) -> None:
    _check_repo(pb2, conditional_repo, artifacts.models_dir / "tinyc" / "1", "KIND_CPU", 8, 100, 16, 5_000)
    for graph in GRAPHS:
        config = _parse(pb2, conditional_repo / f"tinyc_{graph}" / "config.pbtxt")
        [label] = [t for t in config.input if t.name == "y"]
        assert pb2.DataType.Name(label.data_type) == "TYPE_INT64"
        assert list(label.dims) == [1] and label.HasField("reshape") and not label.reshape.shape


def _log_likelihood_reference(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = log_w.astype(np.float64)
    top = w.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(w - top).sum(axis=1, keepdims=True)))[:, 0]
    return lse - np.log(w.shape[1]), w.mean(axis=1)


def test_log_likelihood_graph_is_log_weights_plus_logsumexp(default_repo: Path) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    log_weights = ort.InferenceSession(default_repo / "mnist-vae_log_weights" / "1" / "model.onnx", options)
    reduction = ort.InferenceSession(default_repo / "mnist-vae_log_likelihood" / "1" / "model.onnx", options)
    rng = np.random.default_rng(0)
    # Realistic inputs (decoded samples, binarized: log_w around -100) and random binary noise, whose
    # log_w of about -2000 underflows a naive float32 log(sum(exp())) to -inf.
    decoder = ort.InferenceSession(default_repo / "mnist-vae_decoder" / "1" / "model.onnx", options)
    decoded = decoder.run(None, {"z": rng.standard_normal((3, 32)).astype(np.float32)})[0]
    images = {"digits": (decoded >= 0.5).astype(np.float32),
              "noise": (rng.random((3, 1, 28, 28)) < 0.5).astype(np.float32)}
    for kind, x in images.items():
        for k in (1, 7, 300):
            eps = rng.standard_normal((len(x), k, 32)).astype(np.float32)
            [log_w] = log_weights.run(None, {"x": x, "eps": eps})
            log_likelihood, elbo = reduction.run(None, {"x": x, "eps": eps})
            assert log_likelihood.shape == elbo.shape == (len(x),)
            assert log_likelihood.dtype == np.float32
            expected_ll, expected_elbo = _log_likelihood_reference(log_w)
            # float32 reduction vs float64: a few ulp of |log p(x)| (ulp(2000) = 1.2e-4)
            np.testing.assert_allclose(log_likelihood, expected_ll, rtol=1e-6, atol=1e-5, err_msg=kind)
            np.testing.assert_allclose(elbo, expected_elbo, rtol=1e-6, atol=1e-5, err_msg=kind)
            assert np.all(log_likelihood >= elbo - 1e-3)  # Jensen: the IW bound is at least the ELBO
            if kind == "noise":
                assert np.all(log_w < -150)  # exp(-150) is 0 in float32: the shift is what keeps it finite


def test_conditional_log_likelihood_graph_feeds_the_labels(conditional_repo: Path, artifacts: Any) -> None:
    log_weights = ort.InferenceSession(conditional_repo / "tinyc_log_weights" / "1" / "model.onnx")
    reduction = ort.InferenceSession(conditional_repo / "tinyc_log_likelihood" / "1" / "model.onnx")
    x = artifacts.test_images[:5].numpy().astype(np.float32)
    y = np.arange(5, dtype=np.int64)
    eps = np.random.default_rng(1).standard_normal((5, 50, 4)).astype(np.float32)
    [log_w] = log_weights.run(None, {"x": x, "eps": eps, "y": y})
    log_likelihood, elbo = reduction.run(None, {"x": x, "eps": eps, "y": y})
    expected_ll, expected_elbo = _log_likelihood_reference(log_w)
    np.testing.assert_allclose(log_likelihood, expected_ll, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(elbo, expected_elbo, rtol=1e-6, atol=1e-5)
    other = reduction.run(None, {"x": x, "eps": eps, "y": (y + 1) % 10})[0]
    assert not np.allclose(other, log_likelihood)  # the label really reaches the graph


def test_background_graph_is_exported_with_its_own_reduction(pb2: ModuleType, tmp_path: Path) -> None:
    """An artifact with the optional likelihood-ratio background graph (here: a copy of log_weights)."""
    artifact = _copy_artifact(DEFAULT_MODEL, tmp_path / "models" / "mnist-vae" / "1")
    shutil.copyfile(artifact / "log_weights.onnx", artifact / "background_log_weights.onnx")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["graphs"]["background_log_weights"] = {**manifest["graphs"]["log_weights"],
                                                    "onnx": "background_log_weights.onnx"}
    manifest["files"]["background_log_weights.onnx"] = manifest["files"]["log_weights.onnx"]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "repo"
    names = export_triton_repo(tmp_path / "models", out)
    assert "mnist-vae_background_log_weights" in names and "mnist-vae_background_log_likelihood" in names
    _check_repo(pb2, out, artifact, "KIND_GPU", 64, 2000, 1024, 30_000_000)
    reduction = onnx.load(out / "mnist-vae_background_log_likelihood" / "1" / "model.onnx")
    props = {p.key: p.value for p in reduction.metadata_props}
    assert props["vae_serve.source"] == "mnist-vae/1/background_log_weights.onnx"


def test_tampered_onnx_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact = _copy_artifact(DEFAULT_MODEL, tmp_path / "models" / "mnist-vae" / "1")
    data = bytearray((artifact / "log_weights.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the weights: still a loadable ONNX file
    (artifact / "log_weights.onnx").write_bytes(bytes(data))
    out = tmp_path / "repo"
    assert main(["triton-repo", "--models-dir", str(tmp_path / "models"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sha256 of 'log_weights.onnx'" in err and "corrupt or was modified" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no repository, no partial folder


def test_several_versions_share_one_config(pb2: ModuleType, tmp_path: Path) -> None:
    for version in ("1", "2"):
        _copy_artifact(DEFAULT_MODEL, tmp_path / "models" / "mnist-vae" / version, version)
    out = tmp_path / "repo"
    export_triton_repo(tmp_path / "models", out, ["mnist-vae:1", "mnist-vae:2"])
    for graph in GRAPHS:
        config = _parse(pb2, out / f"mnist-vae_{graph}" / "config.pbtxt")
        assert list(config.version_policy.specific.versions) == [1, 2]
        one, two = (onnx.load(out / f"mnist-vae_{graph}" / v / "model.onnx") for v in ("1", "2"))
        assert one.graph == two.graph  # (the reduction graph's metadata names its source version)
    # no refs: only the latest version, as the service chooses
    export_triton_repo(tmp_path / "models", out, force=True)
    assert sorted(p.name for p in (out / "mnist-vae_encoder").iterdir()) == ["2", "config.pbtxt"]


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _copy_artifact(DEFAULT_MODEL, models / "mnist-vae" / "v2", "v2")
    with pytest.raises(TritonRepoError, match="positive integers"):
        export_triton_repo(models, tmp_path / "repo", ["mnist-vae:v2"])
    with pytest.raises(TritonRepoError, match="not found"):
        export_triton_repo(models, tmp_path / "repo", ["nope"])
    broken = _copy_artifact(DEFAULT_MODEL, models / "mnist-vae" / "4", "4")
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["graphs"]["decoder"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TritonRepoError, match="no ONNX file for the decoder graph"):
        export_triton_repo(models, tmp_path / "repo", ["mnist-vae:4"])
    shutil.rmtree(broken)
    _copy_artifact(DEFAULT_MODEL, models / "mnist-vae" / "3", "3")
    for out in (models, tmp_path, models / "mnist-vae"):  # --force would delete the artifacts
        with pytest.raises(TritonRepoError, match="overlaps the models directory"):
            export_triton_repo(models, out, ["mnist-vae:3"], force=True)
    assert (models / "mnist-vae" / "3" / "manifest.json").is_file()
    with pytest.raises(TritonRepoError, match="max_batch_size"):
        TritonOptions(max_batch_size=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("someone's file")
    with pytest.raises(TritonRepoError, match="--force"):
        export_triton_repo(models, tmp_path / "busy", ["mnist-vae:3"])
    assert (tmp_path / "busy" / "keep.txt").read_text() == "someone's file"


def test_missing_tritonclient_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("triton_model_config_pb2", "tritonclient.grpc.model_config_pb2"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # `import tritonclient` raises ImportError
    with pytest.raises(TritonRepoError, match=r"pip install 'tritonclient\[grpc\]'"):
        export_triton_repo(REPO_ROOT / "models", tmp_path / "repo")


def test_vq_model_exports_its_graphs_and_a_log_likelihood(pb2: ModuleType, tmp_path: Path,
                                                          vq_artifact: Any) -> None:
    out = tmp_path / "repo"
    names = export_triton_repo(vq_artifact.models_dir, out, ["tinyvq"])
    assert sorted(names) == sorted(f"tinyvq_{g}" for g in ("encoder", "decoder", "prior", "prior_sample_row",
                                                           "log_weights", "log_likelihood"))
    inputs = {}
    for graph in ("prior", "prior_sample_row"):
        config = text_format.Parse((out / f"tinyvq_{graph}" / "config.pbtxt").read_text(), pb2.ModelConfig())
        inputs[graph] = [(i.name, pb2.DataType.Name(i.data_type)) for i in config.input]
    assert inputs == {"prior": [("codes", "TYPE_INT64")],
                      "prior_sample_row": [("codes_above", "TYPE_INT64"), ("v_hist", "TYPE_FP32"),
                                           ("u", "TYPE_FP32"), ("temperature", "TYPE_FP32")]}
    # the client-side loop of docs/triton-and-kserve.md over the served file draws the full pass's samples
    session = ort.InferenceSession(out / "tinyvq_prior_sample_row" / "1" / "model.onnx")

    def sample_row(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        names = [i.name for i in session.get_inputs()]
        return tuple(torch.from_numpy(a) for a in session.run(
            None, {n: t.numpy() for n, t in zip(names, args, strict=True)}))

    config = vq_artifact.model.config
    codes, u = separable_draws(vq_artifact.model.prior, 5, (2, 2))
    drawn = sample_rows(sample_row, u, torch.ones(5), grid=(2, 2), codebook_size=8,
                        layers=config.prior_layers, channels=config.prior_channels,
                        half=config.prior_kernel // 2)
    assert torch.equal(drawn, codes)
    log_weights = ort.InferenceSession(out / "tinyvq_log_weights" / "1" / "model.onnx")
    reduction = ort.InferenceSession(out / "tinyvq_log_likelihood" / "1" / "model.onnx")
    rng = np.random.default_rng(0)
    x = (vq_artifact.test_images[:3].numpy() >= 0.5).astype(np.float32)
    u = rng.random((3, 50, 4)).astype(np.float32)
    [log_w] = log_weights.run(None, {"x": x, "u": u})
    log_likelihood, elbo = reduction.run(None, {"x": x, "u": u})
    expected_ll, expected_elbo = _log_likelihood_reference(log_w)
    np.testing.assert_allclose(log_likelihood, expected_ll, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(elbo, expected_elbo, rtol=1e-6, atol=1e-5)
