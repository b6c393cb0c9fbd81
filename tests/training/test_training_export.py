"""Export: manifest per docs/artifact-format.md, checksums, ONNX/TorchScript parity, refusal paths."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import export as export_mod
from training import losses
from training.data import DataSplits
from training.export import ExportError, export_model
from training.graphs import build_graphs
from training.models import VAE, ModelConfig

KINDS = {
    # A Bernoulli mlp whose output logits reach +-40: ONNX Runtime's Sigmoid saturates there, which is
    # what used to make log_w -inf in ONNX (see losses.bernoulli_log_likelihood).
    "mlp-bernoulli": {"architecture": "mlp"},
    "conv-bernoulli-conditional": {"architecture": "conv", "num_classes": 10},
    "mlp-gaussian-pixel": {"architecture": "mlp", "likelihood": "gaussian", "gaussian_variance": "pixel"},
    "linear-gaussian": {"architecture": "linear", "likelihood": "gaussian"},  # pPCA, kind "linear"
}


def _build(kind: str) -> VAE:
    torch.manual_seed(0)
    options = dict(KINDS[kind])
    if options.get("num_classes"):
        options["labels"] = [f"digit {i}" for i in range(options["num_classes"])]
    vae = VAE(ModelConfig(input_shape=(1, 8, 8), latent_dim=4, hidden_dim=32, channels=8, **options))
    with torch.no_grad():
        if kind == "mlp-bernoulli":
            last = vae.decoder.net[-1]
            last.bias.copy_(torch.where(torch.arange(64) % 2 == 0, -40.0, 40.0))
        if kind == "mlp-gaussian-pixel":
            vae.obs_log_var.copy_(torch.linspace(-3, 0, 64).reshape(1, 8, 8))
    return vae.eval()


_ARTIFACTS: dict[str, tuple[VAE, Path]] = {}  # one export per kind for the whole module (~6 s each)


def _artifact(kind: str, tmp_path_factory: pytest.TempPathFactory, digits8: DataSplits) -> tuple[VAE, Path]:
    if kind not in _ARTIFACTS:
        vae = _build(kind)
        path = export_model(vae, digits8, tmp_path_factory.mktemp("models"), kind, "3", calibration_k=8,
                            metrics={"test_nll": 12.5}, training={"data": "digits8"})
        _ARTIFACTS[kind] = (vae, path)
    return _ARTIFACTS[kind]


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             digits8: DataSplits) -> tuple[VAE, Path]:
    return _artifact(request.param, tmp_path_factory, digits8)


def _verify_files(path: Path, manifest: dict) -> None:
    """What docs/artifact-format.md asks of a reader: every listed file exists and matches its sha256."""
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert hashlib.sha256((path / rel).read_bytes()).hexdigest() == digest, rel


def test_manifest_fields(exported: tuple[VAE, Path], digits8: DataSplits) -> None:
    vae, path = exported
    cfg = vae.config
    name = path.parent.name
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["name"] == name and manifest["version"] == "3" and path.name == "3"
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", manifest["name"])
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None
    assert manifest["framework"] == {"torch": torch.__version__, "onnx_opset": 18}
    conditional = bool(cfg.num_classes)
    kind = "cvae" if conditional else ("linear" if cfg.architecture == "linear" else "vae")
    assert manifest["model"]["kind"] == kind
    assert manifest["model"]["architecture"] == cfg.architecture
    assert manifest["model"]["latent_dim"] == 4
    assert ModelConfig(**manifest["model"]["config"]) == cfg  # enough to rebuild the model
    assert manifest["input"] == {"channels": 1, "height": 8, "width": 8, "dtype": "float32",
                                 "value_range": [0.0, 1.0]}
    prep = manifest["preprocessing"]
    assert (prep["color_mode"], prep["channels"], prep["height"], prep["width"]) == ("L", 1, 8, 8)
    assert prep["resample"] == "bilinear" and prep["value_range"] == [0.0, 1.0]
    assert manifest["likelihood"]["family"] == cfg.likelihood
    if cfg.likelihood == "bernoulli":
        assert prep["binarize_threshold"] == 0.5
    else:
        assert prep["binarize_threshold"] is None
        assert manifest["likelihood"]["variance"] == cfg.gaussian_variance
        expected_std = float(torch.exp(0.5 * vae.obs_log_var.detach()).mean())
        assert manifest["likelihood"]["mean_std"] == pytest.approx(expected_std, rel=1e-6)
    assert manifest["prior"] == {"family": "gaussian", "mean": 0.0, "std": 1.0}
    assert manifest["labels"] == (cfg.labels if conditional else None)
    extra = ["y"] if conditional else []
    assert manifest["graphs"] == {
        "encoder": {"onnx": "encoder.onnx", "torchscript": "encoder.pt", "inputs": ["x", *extra],
                    "outputs": ["mean", "log_var"]},
        "decoder": {"onnx": "decoder.onnx", "torchscript": "decoder.pt", "inputs": ["z", *extra],
                    "outputs": ["x_mean"]},
        "log_weights": {"onnx": "log_weights.onnx", "torchscript": "log_weights.pt",
                        "inputs": ["x", "eps", *extra], "outputs": ["log_w"]},
    }
    for graph, entry in manifest["parity"].items():
        assert entry["rows"] == 16
        limit = 1e-4 if graph != "log_weights" else 1e-4 + 2e-5 * 1e4  # |log_w| of these models is < 1e4
        assert entry["tolerance"] == ("0.0001 + 2e-05 * sum |terms of log_w|" if graph == "log_weights"
                                      else "0.0001")
        assert entry["tolerance_factor"] == 1.0 and entry["max_error_over_tolerance"] <= 1.0
        for runtime in ("onnx", "torchscript"):
            assert 0 <= entry["max_abs_error"][runtime] <= limit, (graph, runtime)
    cal = manifest["anomaly"]  # conformal calibration of every method (conditional models score with y)
    assert "calibration" not in manifest and cal["k"] == 8
    # auto: the OOD suite on the validation split chose it (conditional models score with labels too)
    selection = cal["selection"]
    assert cal["default_method"] == selection["method"] and selection["normal_split"] == "validation"
    assert selection["method"] in cal["methods"] and set(selection["methods"]) == set(cal["methods"])
    assert cal["min_alpha"] == pytest.approx(1 / (len(digits8.val_images) + 1))
    assert cal["calibration_split"] == {**cal["calibration_split"], "name": "validation",
                                        "n": len(digits8.val_images), "held_out_of_model_selection": False}
    assert {"nll", "typicality", "complexity", "combined", "latent_knn", "fisher"} <= set(cal["methods"])
    scores = cal["methods"]["nll"]["scores"]
    assert len(scores) == len(digits8.val_images) and scores == sorted(scores)
    assert manifest["data"]["name"] == "digits8"
    assert manifest["metrics"] == {"test_nll": 12.5} and manifest["training"] == {"data": "digits8"}
    _verify_files(path, manifest)
    assert not list(path.parent.glob(".*.partial"))


def test_checksums_detect_tampering(exported: tuple[VAE, Path], tmp_path: Path) -> None:
    _, path = exported
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    _verify_files(copy, manifest)
    with open(copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(AssertionError, match=r"decoder\.onnx"):
        _verify_files(copy, manifest)


def _inputs(vae: VAE, batch: int, k: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    c, h, w = vae.config.input_shape
    d = vae.config.latent_dim
    x = torch.bernoulli(torch.rand(batch, c, h, w, generator=gen))
    n_classes = vae.config.num_classes
    y = {"y": torch.randint(0, n_classes, (batch,), generator=gen)} if n_classes else {}
    return {
        "encoder": {"x": x, **y},
        "decoder": {"z": 2 * torch.randn(batch, d, generator=gen), **y},
        "log_weights": {"x": x, "eps": torch.randn(batch, k, d, generator=gen), **y},
    }


@pytest.mark.parametrize(("batch", "k"), [(5, 7), (1, 1), (33, 2)])
def test_runtimes_match_eager_on_new_shapes(exported: tuple[VAE, Path], batch: int, k: int) -> None:
    """Dynamic batch and K: shapes never seen at export (traced with batch 2, K 3; checked at 16 x 32)."""
    vae, path = exported
    graphs = build_graphs(vae)
    for graph, feeds in _inputs(vae, batch, k, seed=batch * 100 + k).items():
        with torch.no_grad():
            eager = graphs[graph](*feeds.values())
        eager = [t.numpy() for t in (eager if isinstance(eager, tuple) else (eager,))]
        session = ort.InferenceSession(str(path / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(feeds)
        onnx_out = session.run(None, {n: t.numpy() for n, t in feeds.items()})
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ts_out = torch.jit.load(str(path / f"{graph}.pt"))(*feeds.values())
        ts_out = [t.numpy() for t in (ts_out if isinstance(ts_out, tuple) else (ts_out,))]
        for ref, got_onnx, got_ts in zip(eager, onnx_out, ts_out, strict=True):
            assert got_onnx.shape == ref.shape == got_ts.shape
            assert np.isfinite(got_onnx).all()
            scale = np.maximum(1.0, np.abs(ref) / 100.0) if graph == "log_weights" else 1.0
            assert (np.abs(got_onnx - ref) / scale).max() <= 1e-4, graph
            assert (np.abs(got_ts - ref) / scale).max() <= 1e-4, graph
        if graph == "log_weights":
            assert onnx_out[0].shape == (batch, k)


def test_onnx_log_weights_give_the_iw_bound(exported: tuple[VAE, Path], digits8: DataSplits) -> None:
    """What the service does with the graph: logsumexp(log_w) - log K equals the eager IW bound."""
    vae, path = exported
    x = (digits8.test_images[:6] >= 0.5).float()
    y = digits8.test_labels[:6]
    eps = torch.randn(6, 50, 4, generator=torch.Generator().manual_seed(0))
    feeds = {"x": x.numpy(), "eps": eps.numpy()}
    if vae.config.num_classes:
        feeds["y"] = y.numpy()
    session = ort.InferenceSession(str(path / "log_weights.onnx"), providers=["CPUExecutionProvider"])
    log_w = torch.from_numpy(session.run(None, feeds)[0]).double()
    with torch.no_grad():
        expected = losses.iwae_bound(vae.log_weights(x, eps, y if vae.config.num_classes else None))
    torch.testing.assert_close(losses.iwae_bound(log_w).float(), expected, atol=1e-3, rtol=1e-5)


# -- refusal paths ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory: pytest.TempPathFactory, digits8: DataSplits) -> Path:
    return _artifact("mlp-bernoulli", tmp_path_factory, digits8)[1]


@pytest.fixture
def fast_exporters(monkeypatch: pytest.MonkeyPatch, mlp_artifact: Path) -> VAE:
    """Make the ONNX/TorchScript writers copy a previously exported artifact of the same model (seconds
    saved per test); everything after them (parity check, calibration, manifest, rename) runs for real."""
    vae = _build("mlp-bernoulli")
    source = mlp_artifact

    def copy_file(module: torch.nn.Module, inputs: tuple, *rest: object) -> None:
        path = Path(rest[-1])  # both writers take the destination path last
        shutil.copy(source / path.name, path)

    monkeypatch.setattr(export_mod, "export_torchscript", copy_file)
    monkeypatch.setattr(export_mod, "export_onnx", copy_file)
    return vae


def _assert_nothing_written(models: Path) -> None:
    leftovers = [str(p.relative_to(models)) for p in models.rglob("*")] if models.exists() else []
    assert leftovers == []


def test_export_refuses_when_onnx_output_differs(fast_exporters: VAE, digits8: DataSplits, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = ort.InferenceSession.run

    def perturbed(self: ort.InferenceSession, *args: object, **kwargs: object) -> list[np.ndarray]:
        return [out + np.float32(1e-2) for out in real_run(self, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", perturbed)
    models = tmp_path / "models"
    with pytest.raises(ExportError, match="encoder onnx output 'mean' differs from eager PyTorch at element"):
        export_model(fast_exporters, digits8, models, "vae", "1", calibration_k=4)
    _assert_nothing_written(models)


def test_export_refuses_at_negative_tolerance(fast_exporters: VAE, digits8: DataSplits, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "ABS_TOLERANCE", -1.0)
    models = tmp_path / "models"
    (models / "vae" / "1").mkdir(parents=True)  # an existing, good version must survive a failed --force
    (models / "vae" / "1" / "keep").write_text("old")
    with pytest.raises(ExportError, match="tolerance"):
        export_model(fast_exporters, digits8, models, "vae", "2", calibration_k=4)
    with pytest.raises(ExportError, match="tolerance"):
        export_model(fast_exporters, digits8, models, "vae", "1", calibration_k=4, force=True)
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == ["vae", "vae/1", "vae/1/keep"]


def test_export_refuses_to_overwrite_without_force(fast_exporters: VAE, digits8: DataSplits,
                                                   tmp_path: Path) -> None:
    first = export_model(fast_exporters, digits8, tmp_path, "vae", "1", calibration_k=4)
    stamp = (first / "manifest.json").read_text()
    with pytest.raises(ExportError, match="exists"):
        export_model(fast_exporters, digits8, tmp_path, "vae", "1", calibration_k=4)
    assert (first / "manifest.json").read_text() == stamp
    (first / "stray.txt").write_text("from the old version")
    again = export_model(fast_exporters, digits8, tmp_path, "vae", "1", calibration_k=4, force=True)
    assert again == first and not (again / "stray.txt").exists()
    _verify_files(again, json.loads((again / "manifest.json").read_text()))


@pytest.mark.parametrize(("name", "version"), [("Bad Name", "1"), ("../up", "1"), ("vae", "../2"),
                                               ("vae", ".hidden"), ("", "1")])
def test_export_rejects_unsafe_names(name: str, version: str, digits8: DataSplits, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="must match"):
        export_model(_build("mlp-bernoulli"), digits8, tmp_path / "models", name, version)
    _assert_nothing_written(tmp_path / "models")


# -- parity judged against the terms log_w sums; the level the calibration can reach (issue 19) --------
@pytest.mark.parametrize("kind", ["mlp-bernoulli", "mlp-gaussian-pixel", "linear-gaussian"])
def test_log_weight_magnitude_bounds_log_w(kind: str, digits8: DataSplits) -> None:
    """sum |terms| >= |sum terms| (triangle inequality), equal-ish for Bernoulli models whose pixel terms
    all have one sign; a Gaussian decoder's terms can be far larger than the log_w they sum to."""
    vae = _build(kind)
    x = digits8.test_images[:6]
    eps = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_w = vae.log_weights(x, eps).double()
    magnitude = vae.log_weight_magnitude(x, eps)
    assert magnitude.shape == (6, 5) and magnitude.dtype == torch.float64
    assert (magnitude >= log_w.abs() - 1e-4).all()
    if kind == "mlp-gaussian-pixel":
        assert (magnitude > log_w.abs() + 1.0).any()


def test_parity_failure_names_the_worst_element_and_the_override(fast_exporters: VAE, digits8: DataSplits,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One log_w element off by 0.05: the message names it, its values and the factor that would accept
    it; exporting with that --parity-tolerance succeeds and records the factor."""
    real_run = ort.InferenceSession.run

    def one_element_off(self: ort.InferenceSession, *args: object, **kwargs: object) -> list[np.ndarray]:
        outputs = real_run(self, *args, **kwargs)
        if [o.name for o in self.get_outputs()] == ["log_w"] and outputs[0].shape == (16, 32):
            outputs[0] = outputs[0].copy()
            outputs[0][3, 5] += np.float32(0.05)
        return outputs

    monkeypatch.setattr(ort.InferenceSession, "run", one_element_off)
    models = tmp_path / "models"
    with pytest.raises(ExportError) as failed:
        export_model(fast_exporters, digits8, models, "vae", "1", calibration_k=4, anomaly_method="nll")
    message = str(failed.value)
    assert "log_weights onnx output 'log_w'" in message and "element [3, 5]" in message
    assert "1 of 512 elements" in message and "error 0.05" in message
    factor = re.search(r"--parity-tolerance (\S+) ", message).group(1)
    _assert_nothing_written(models)
    path = export_model(fast_exporters, digits8, models, "vae", "1", calibration_k=4, anomaly_method="nll",
                        parity_tolerance=float(factor))
    parity = json.loads((path / "manifest.json").read_text())["parity"]
    assert parity["log_weights"]["tolerance_factor"] == float(factor)
    assert 0.9 < parity["log_weights"]["max_error_over_tolerance"] <= 1.0
    assert parity["log_weights"]["tolerance"].startswith(f"{float(factor):g} x (")


def test_export_refuses_an_alpha_its_calibration_cannot_reach(fast_exporters: VAE, digits8: DataSplits,
                                                              tmp_path: Path) -> None:
    """digits8 without a calibration split calibrates on its 144 validation images: p >= 1/145."""
    assert len(digits8.calibration_images) == 0 and len(digits8.val_images) == 144
    with pytest.raises(ExportError, match=r"1/145 = 0.006897, above alpha = 0.005") as refused:
        export_model(fast_exporters, digits8, tmp_path, "vae", "1", calibration_k=4, alpha=0.005,
                     anomaly_method="nll")
    assert "at least 199 images" in str(refused.value) and "--alpha 0.0069" in str(refused.value)
    path = export_model(fast_exporters, digits8, tmp_path, "vae", "1", calibration_k=4, alpha=0.01,
                        anomaly_method="nll")
    record = json.loads((path / "manifest.json").read_text())["anomaly"]
    assert record["min_alpha"] == pytest.approx(1 / 145) and record["alpha"] == 0.01
