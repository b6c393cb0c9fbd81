"""service/anomaly.py against hand computations: p-values, thresholds, the conformal false-alarm
guarantee, typicality's two sides, complexity in nats, likelihood ratios, latent nearest neighbours
and Fisher's combination; and the manifest's `anomaly` record as service/artifacts.py parses it."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from service import anomaly
from service.anomaly import (
    AnomalyError,
    LatentBank,
    MethodCalibration,
    TypicalityReference,
    anomaly_scores,
    calibration_record,
    complexity_nats,
    conformal_p_values,
    conformal_threshold,
    false_alarm_bound,
    fisher_score,
    fisher_statistics,
    geometric_transforms,
    is_anomaly,
    knn_distance,
    orientation_gain,
    orientation_views,
    reconstruction_error,
    score_and_test,
    tail_p_values,
    transform_names,
)
from service.artifacts import LATENT_BANK_FILE, ArtifactError, load_manifest, sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- conformal p-values --------------------------------------------------------------------------------
def test_p_value_formula_by_hand() -> None:
    cal = np.array([1.0, 2.0, 3.0, 4.0])  # n = 4
    # s = 2.5: calibration >= 2.5 are {3, 4} -> p = (1 + 2) / 5
    # s = 3.0: ties count as >= -> {3, 4} -> 3/5; s = 0: all 4 -> 5/5 = 1; s = 9: none -> 1/5
    np.testing.assert_allclose(conformal_p_values(np.array([2.5, 3.0, 0.0, 9.0]), cal),
                               [3 / 5, 3 / 5, 1.0, 1 / 5])
    # The calibration need not be sorted.
    np.testing.assert_allclose(conformal_p_values(np.array([2.5]), cal[::-1]), [3 / 5])


def test_nan_score_is_most_anomalous() -> None:
    assert conformal_p_values(np.array([math.nan]), np.array([1.0, 2.0]))[0] == pytest.approx(1 / 3)


def test_threshold_agrees_with_p_values() -> None:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=99)  # n + 1 = 100: alpha = 0.05 allows #{cal >= s} <= 4
    t = conformal_threshold(cal, 0.05)
    assert t == pytest.approx(np.sort(cal)[::-1][4])  # the 5th largest
    s = np.concatenate([rng.normal(size=2000) * 2, cal, [t, np.nextafter(t, np.inf)]])
    flags = is_anomaly(s, cal, 0.05)
    np.testing.assert_array_equal(flags, s > t)
    np.testing.assert_array_equal(flags, conformal_p_values(s, cal) <= 0.05 + 1e-12)


def test_threshold_is_infinite_when_alpha_is_too_small_for_n() -> None:
    cal = np.arange(10.0)  # alpha (n + 1) = 0.05 * 11 = 0.55 < 1: even the smallest p, 1/11, exceeds alpha
    assert conformal_threshold(cal, 0.05) == math.inf
    assert not is_anomaly(np.array([1e9]), cal, 0.05).any()
    p = conformal_p_values(np.array([1e9]), cal)[0]
    assert p == pytest.approx(1 / 11) and p > 0.05


def test_alpha_times_n_plus_one_rounding() -> None:
    # 0.05 * 20 = 1.0000000000000002 in floats; 0.07 * 100 = 7.000000000000001: both must count as exact.
    assert anomaly.max_count(0.05, 19) == 0
    assert anomaly.max_count(0.07, 99) == 6
    with pytest.raises(AnomalyError):
        anomaly.max_count(0.0, 10)


def test_alpha_just_below_one_stays_inside_the_calibration_scores() -> None:
    """alpha within 1e-9 / (n + 1) of 1 once gave max_count = n, one past the scores: an IndexError (500)."""
    cal = np.arange(144.0)
    alpha = 0.999999999999
    assert anomaly.max_count(alpha, len(cal)) == len(cal) - 1
    assert conformal_threshold(cal, alpha) == 0.0  # every score above the smallest has p <= n / (n + 1)
    s = np.array([-1.0, 0.0, 0.5, 1e9])
    np.testing.assert_array_equal(is_anomaly(s, cal, alpha), s > 0.0)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_conformal_false_alarm_guarantee_on_exchangeable_data(alpha: float) -> None:
    """Normal data exchangeable with the calibration: P(p <= alpha) = floor(alpha (n+1)) / (n+1) <= alpha.

    20000 independent trials (fresh calibration set and fresh test point each), heavy-tailed scores.
    """
    rng = np.random.default_rng(1)
    n, trials = 199, 20_000
    cal = rng.standard_t(df=3, size=(trials, n))
    test = rng.standard_t(df=3, size=trials)
    flagged = np.array([is_anomaly(test[i:i + 1], cal[i], alpha)[0] for i in range(trials)])
    expected = false_alarm_bound(alpha, n)
    assert expected <= alpha
    se = math.sqrt(expected * (1 - expected) / trials)
    assert abs(flagged.mean() - expected) < 4 * se + 1e-9
    # And the p-values are (super-)uniform: P(p <= u) <= u for several u.
    p = np.array([conformal_p_values(test[i:i + 1], cal[i])[0] for i in range(0, trials, 4)])
    for u in (0.1, 0.3, 0.5):
        assert (p <= u).mean() <= u + 4 * math.sqrt(u * (1 - u) / len(p))


def test_false_alarm_control_fails_without_exchangeability() -> None:
    """The guarantee is about normal data: a shifted test distribution is flagged far more often."""
    rng = np.random.default_rng(2)
    cal = rng.normal(size=999)
    shifted = rng.normal(loc=3.0, size=5000)
    assert is_anomaly(shifted, cal, 0.01).mean() > 0.3


# -- scores --------------------------------------------------------------------------------------------
def test_typicality_is_two_sided_and_scaled_per_side() -> None:
    ref = TypicalityReference(center=80.0, scale_low=10.0, scale_high=40.0)
    s = anomaly.typicality_score(np.array([80.0, 60.0, 120.0, 100.0, 40.0]), ref)
    # below: (80 - 60) / 10 = 2; above: (120 - 80) / 40 = 1; (100 - 80) / 40 = 0.5; (80 - 40) / 10 = 4
    np.testing.assert_allclose(s, [0.0, 2.0, 1.0, 0.5, 4.0])
    # Too likely is anomalous too, which -log p(x) alone cannot say.
    assert s[1] > s[2] and np.array([60.0]) < np.array([120.0])


def test_typicality_with_unit_scales_is_nalisnick_distance() -> None:
    ref = TypicalityReference(center=5.0)
    np.testing.assert_allclose(anomaly.typicality_score(np.array([2.0, 9.0]), ref), [3.0, 4.0])


def test_typicality_reference_fit() -> None:
    v = np.arange(101.0)  # quantiles 0.01, 0.5, 0.99 -> 1, 50, 99
    ref = TypicalityReference.fit(v, tail=0.01)
    assert (ref.center, ref.scale_low, ref.scale_high) == pytest.approx((50.0, 49.0, 49.0))
    with pytest.raises(AnomalyError):
        TypicalityReference(1.0, 0.0, 1.0)


def test_complexity_is_zlib_length_in_nats() -> None:
    rng = np.random.default_rng(3)
    blank = np.zeros((1, 1, 28, 28))
    noisy = rng.random((1, 1, 28, 28))
    got = complexity_nats(np.concatenate([blank, noisy]))
    for i, img in enumerate((blank, noisy)):
        raw = np.clip(np.rint(img[0] * 255), 0, 255).astype(np.uint8).tobytes()
        assert got[i] == pytest.approx(8 * math.log(2) * len(zlib.compress(raw, 9)))
    assert got[0] < 100 < 4000 < got[1]  # a blank image compresses to ~a dozen bytes, noise does not compress
    assert len(raw) == 784


def test_complexity_score_is_nll_minus_complexity() -> None:
    images = np.zeros((2, 1, 4, 4))
    images[1, 0, ::2, ::2] = 1.0
    nll = np.array([10.0, 20.0])
    expected = nll - complexity_nats(images)
    np.testing.assert_allclose(anomaly_scores("complexity", nll, images=images), expected)


def test_likelihood_ratio_and_nll() -> None:
    nll, bg = np.array([100.0, 50.0]), np.array([90.0, 10.0])
    np.testing.assert_allclose(anomaly_scores("likelihood_ratio", nll, background_nll=bg), [10.0, 40.0])
    np.testing.assert_allclose(anomaly_scores("nll", nll), nll)


def test_combined_is_max_of_typicality_and_standardized_complexity() -> None:
    images = np.zeros((3, 1, 4, 4))  # all blank: the same complexity L for every image
    length = complexity_nats(images[:1])[0]
    nll = np.array([80.0, 50.0, 130.0])
    typ = TypicalityReference(80.0, 10.0, 40.0)  # typicality: 0, 3, 1.25
    cref = TypicalityReference(80.0 - length, 1.0, 20.0)  # complexity z: (nll - 80) / 20 = 0, -1.5, 2.5
    got = anomaly_scores("combined", nll, images=images, typicality=typ, complexity_reference=cref)
    np.testing.assert_allclose(got, [0.0, 3.0, 2.5])
    with pytest.raises(AnomalyError):
        anomaly_scores("combined", nll, images=images, typicality=typ)


def test_knn_distance_by_hand() -> None:
    bank = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 10.0]])
    points = np.array([[0.0, 1.0], [3.0, 4.0]])
    np.testing.assert_allclose(knn_distance(points, bank, 1), [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(knn_distance(points, bank, 2), [math.hypot(3, 3), 5.0])
    # cosine: [0, 1] is parallel to [0, 10] (distance 0) and orthogonal to nothing else here
    cos = knn_distance(np.array([[0.0, 1.0]]), bank[1:], 1, "cosine")
    np.testing.assert_allclose(cos, [0.0], atol=1e-12)
    np.testing.assert_allclose(knn_distance(np.array([[1.0, 0.0]]), bank[1:], 2, "cosine"), [1.0])
    for bad in ({"k": 4}, {"k": 0}, {"metric": "manhattan"}):
        with pytest.raises(AnomalyError):
            knn_distance(points, bank, **bad)
    with pytest.raises(AnomalyError):
        knn_distance(np.ones((1, 3)), bank)


def test_a_prepared_latent_bank_gives_the_same_bits() -> None:
    """The served calibration prepares its bank once (LatentBank); the scores must not move by a bit."""
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    points = rng.normal(size=(5, 8)).astype(np.float32)
    prepared = LatentBank(bank)
    assert prepared.shape == (200, 8) and len(prepared) == 200
    for k, metric in ((1, "euclidean"), (5, "cosine")):
        np.testing.assert_array_equal(knn_distance(points, prepared, k, metric),
                                      knn_distance(points, bank, k, metric))
    with pytest.raises(AnomalyError):
        LatentBank(bank[0])


def test_tail_p_values_by_hand() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0])  # n = 4
    np.testing.assert_allclose(tail_p_values(np.array([0.0, 2.5, 4.0, 9.0]), ref, "upper"),
                               [5 / 5, 3 / 5, 2 / 5, 1 / 5])
    # two-sided: 2 min(upper, lower), lower = (1 + #{ref <= v}) / 5
    np.testing.assert_allclose(tail_p_values(np.array([0.0, 2.5, 9.0]), ref, "two_sided"),
                               [2 * 1 / 5, 1.0, 2 * 1 / 5])
    assert tail_p_values(np.array([np.nan]), ref, "upper")[0] == pytest.approx(1 / 5)
    with pytest.raises(AnomalyError):
        tail_p_values(ref, ref, "left")


def test_fisher_is_minus_two_sum_log_p_over_its_statistics() -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((3, 1, 6, 6)) > 0.5).astype(np.float64)
    raw = images * 0.8
    nll, mu, bank = np.array([50.0, 60.0, 70.0]), rng.normal(size=(3, 2)), rng.normal(size=(8, 2))
    errors = rng.normal(100.0, 10.0, size=(6, 3))  # (1 + T, N) reconstruction errors
    stats = fisher_statistics(nll, images, raw, mu, errors, bank)
    assert set(stats) == set(anomaly.FISHER_STATISTICS)
    np.testing.assert_allclose(stats["complexity"], nll - complexity_nats(images))
    np.testing.assert_allclose(stats["latent_knn"], knn_distance(mu, bank, 1))
    np.testing.assert_allclose(stats["latent_knn_cosine"], knn_distance(mu, bank, 5, "cosine"))
    np.testing.assert_allclose(stats["input_complexity"], complexity_nats(raw))
    np.testing.assert_allclose(stats["orientation_gain"], orientation_gain(errors))
    reference = {name: rng.normal(size=20) * v.std() + v.mean() for name, v in stats.items()}
    expected = sum(-2 * np.log(tail_p_values(stats[n], reference[n], tail))
                   for n, tail in anomaly.FISHER_STATISTICS.items())
    np.testing.assert_allclose(fisher_score(stats, reference), expected)
    got = anomaly_scores("fisher", nll, images=images, raw_images=raw, latent_mean=mu, latent_bank=bank,
                         reconstruction_errors=errors, fisher_reference=reference)
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(anomaly_scores("latent_knn", nll, latent_mean=mu, latent_bank=bank),
                               stats["latent_knn"])
    with pytest.raises(AnomalyError):
        fisher_score({k: v for k, v in stats.items() if k != "latent_knn"}, reference)
    with pytest.raises(AnomalyError):  # fisher without the transforms' reconstruction errors
        anomaly_scores("fisher", nll, images=images, raw_images=raw, latent_mean=mu, latent_bank=bank,
                       fisher_reference=reference)
    with pytest.raises(AnomalyError):  # errors for 2 images, means for 3
        fisher_statistics(nll, images, raw, mu, errors[:, :2], bank)


def test_geometric_transforms_by_hand() -> None:
    x = np.arange(6.0).reshape(1, 1, 2, 3)  # [[0 1 2], [3 4 5]]: not square, so no quarter turns
    assert transform_names(2, 3) == ("hflip", "vflip", "rot180")
    hflip, vflip, rot180 = geometric_transforms(x)[:, 0, 0]
    np.testing.assert_array_equal(hflip, [[2, 1, 0], [5, 4, 3]])
    np.testing.assert_array_equal(vflip, [[3, 4, 5], [0, 1, 2]])
    np.testing.assert_array_equal(rot180, [[5, 4, 3], [2, 1, 0]])
    square = np.arange(4.0).reshape(1, 1, 2, 2)  # [[0 1], [2 3]]
    assert transform_names(2, 2) == tuple(anomaly.GEOMETRIC_TRANSFORMS)
    turned = geometric_transforms(square)[:, 0, 0]  # (T, H, W)
    np.testing.assert_array_equal(turned[2], [[1, 3], [0, 2]])  # rot90: counter-clockwise
    np.testing.assert_array_equal(turned[4], [[2, 0], [3, 1]])  # rot270
    assert geometric_transforms(np.ones((4, 1, 5, 5))).shape == (5, 4, 1, 5, 5)
    with pytest.raises(AnomalyError):
        geometric_transforms(np.ones((5, 5)))


def test_orientation_gain_by_hand() -> None:
    """R(x) - min_T R(T x): positive when a transform makes the image better explained."""
    errors = np.array([[30.0, 10.0],  # R(x) of two images
                       [12.0, 40.0],  # T1: the first is explained better turned, the second worse
                       [50.0, 20.0]])  # T2
    np.testing.assert_allclose(orientation_gain(errors), [30.0 - 12.0, 10.0 - 20.0])
    with pytest.raises(AnomalyError):
        orientation_gain(errors[:1])  # no transform
    with pytest.raises(AnomalyError):
        orientation_gain(errors[:, 0])  # not (1 + T, N)


def test_orientation_views_stack_the_images_then_each_transform() -> None:
    x = np.arange(2 * 4.0).reshape(2, 1, 2, 2)
    rows = orientation_views(x)
    assert rows.shape == (6 * 2, 1, 2, 2)  # (1 + T) N with T = 5 for square images
    np.testing.assert_array_equal(rows[:2], x)
    np.testing.assert_array_equal(rows.reshape(6, 2, 1, 2, 2)[1:], geometric_transforms(x))


def test_reconstruction_error_by_hand() -> None:
    """Bernoulli: cross-entropy in nats, saturated probabilities clipped; Gaussian: half the squared error."""
    x = np.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    p = np.array([0.5, 0.25, 1.0, 1.0]).reshape(1, 1, 2, 2)  # the last pixel: p = 1 for a 0
    clip = anomaly.BERNOULLI_CLIP
    expected = -(math.log(0.5) + math.log(0.75) + math.log(1 - clip) + math.log(clip))
    np.testing.assert_allclose(reconstruction_error(x, p, "bernoulli"), [expected])
    assert np.isfinite(reconstruction_error(x, p, "bernoulli")).all()
    np.testing.assert_allclose(reconstruction_error(x, p, "gaussian"), [0.5 * (0.25 + 0.0625 + 0 + 1.0)])
    with pytest.raises(AnomalyError):
        reconstruction_error(x, p[..., :1], "bernoulli")  # shapes differ
    with pytest.raises(AnomalyError):
        reconstruction_error(x, p, "poisson")


def test_fisher_flags_an_outlier_in_any_one_statistic() -> None:
    """A value far out in one statistic (the others typical) gets a large score: the point of combining."""
    rng = np.random.default_rng(1)
    reference = {name: np.sort(rng.normal(size=200)) for name in anomaly.FISHER_STATISTICS}
    typical = {name: np.zeros(1) for name in anomaly.FISHER_STATISTICS}
    base = fisher_score(typical, reference)[0]
    for name, tail in anomaly.FISHER_STATISTICS.items():
        out = {**typical, name: np.array([10.0])}
        assert fisher_score(out, reference)[0] > base + 8.0
        if tail == "two_sided":  # too small is as anomalous as too large
            assert fisher_score({**typical, name: np.array([-10.0])}, reference)[0] > base + 8.0
        else:
            assert fisher_score({**typical, name: np.array([-10.0])}, reference)[0] <= base


@pytest.mark.parametrize("method, kwargs", [
    ("complexity", {}), ("likelihood_ratio", {}), ("typicality", {}), ("nope", {}),
    ("likelihood_ratio", {"background_nll": np.ones(3)}),
    ("latent_knn", {}), ("latent_knn", {"latent_mean": np.ones((3, 2)), "latent_bank": np.ones((5, 2))}),
    ("fisher", {"latent_mean": np.ones((2, 2)), "latent_bank": np.ones((5, 2))}),
])
def test_missing_inputs_are_errors(method: str, kwargs: dict) -> None:
    with pytest.raises(AnomalyError):
        anomaly_scores(method, np.ones(2), **kwargs)


def test_score_and_test_returns_route_fields() -> None:
    cal = MethodCalibration("nll", tuple(float(v) for v in range(1, 100)))  # n = 99; alpha 0.05: 5th largest
    out = score_and_test("nll", cal, 0.05, np.array([50.0, 96.0, 95.0]))
    assert [r.is_anomaly for r in out] == [False, True, False]
    assert out[0].threshold == 95.0 and out[0].method == "nll" and out[0].alpha == 0.05
    assert out[1].p_value == pytest.approx((1 + 4) / 100)
    assert [r.percentile for r in out] == pytest.approx([100 * 49 / 99, 100 * 95 / 99, 100 * 94 / 99])
    with pytest.raises(AnomalyError):
        score_and_test("typicality", cal, 0.05, np.ones(1))


def test_calibration_arrays_are_built_once_sorted_and_read_only() -> None:
    reference = {name: (3.0, 1.0, 2.0) for name in anomaly.FISHER_STATISTICS}
    cal = MethodCalibration("fisher", (1.0, 2.0, 5.0), fisher_reference=reference)
    assert cal.score_array is cal.score_array  # one conversion per model, not per request
    np.testing.assert_array_equal(cal.score_array, [1.0, 2.0, 5.0])
    assert cal.fisher_arrays is not None and cal.fisher_arrays is cal.fisher_arrays
    for values in cal.fisher_arrays.values():
        np.testing.assert_array_equal(values, [1.0, 2.0, 3.0])
        with pytest.raises(ValueError):
            values[0] = 9.0  # shared by every request
    assert MethodCalibration("nll", (1.0,)).fisher_arrays is None


def test_calibration_record() -> None:
    rec = calibration_record("typicality", [3.0, 1.0, 2.0], TypicalityReference(1.0, 2.0, 3.0), note="x")
    assert rec["scores"] == [1.0, 2.0, 3.0] and rec["n"] == 3 and rec["note"] == "x"
    assert rec["reference"] == {"center": 1.0, "scale_low": 2.0, "scale_high": 3.0}
    with pytest.raises(AnomalyError):
        calibration_record("nll", [1.0, math.inf])


# -- the manifest record -------------------------------------------------------------------------------
def test_mnist_vae_1_is_calibrated_conformally() -> None:
    """The retired percentile calibration is gone from every committed model (re-calibrated, weights kept)."""
    m = load_manifest(REPO_ROOT / "models" / "mnist-vae" / "1", "onnx")
    assert m.anomaly is not None and "calibration" not in m.raw and "background_log_weights" not in m.graphs
    assert "likelihood_ratio" not in m.anomaly.methods and m.anomaly.default_method in m.anomaly.methods


def _with_anomaly(models: Path, record: dict, bank: np.ndarray | None = None, checksum: bool = True) -> Path:
    """mnist-vae/1's manifest (graphs not copied: only files listed stay verified) plus an anomaly record,
    and a latent bank file when given."""
    directory = models / "mnist-vae" / "9"
    directory.mkdir(parents=True)
    src = REPO_ROOT / "models" / "mnist-vae" / "1"
    raw = json.loads((src / "manifest.json").read_text())
    for name in ("log_weights.onnx",):
        (directory / name).write_bytes((src / name).read_bytes())
    raw["files"] = {"log_weights.onnx": raw["files"]["log_weights.onnx"]}
    if bank is not None:
        np.save(directory / LATENT_BANK_FILE, bank)
        if checksum:
            raw["files"][LATENT_BANK_FILE] = sha256_file(directory / LATENT_BANK_FILE)
    raw["graphs"] = {g: {**spec, "onnx": "log_weights.onnx"} for g, spec in raw["graphs"].items()}
    raw["anomaly"] = record
    raw["version"] = directory.name  # the manifest's version must match its folder
    (directory / "manifest.json").write_text(json.dumps(raw))
    return directory


def _record(**over: object) -> dict:
    rec = {"k": 256, "alpha": 0.01, "default_method": "typicality", "methods": {
        "nll": calibration_record("nll", [1.0, 2.0, 3.0]),
        "typicality": calibration_record("typicality", [0.1, 0.2], TypicalityReference(80.0, 10.0, 40.0)),
        "combined": calibration_record("combined", [0.5], TypicalityReference(80.0, 10.0, 40.0),
                                       TypicalityReference(-300.0, 5.0, 30.0)),
        "regret": {"scores": [1.0]},  # a method this service does not know: skipped, not an error
    }}
    rec.update(over)
    return rec


def test_manifest_anomaly_record_is_parsed(tmp_path: Path) -> None:
    m = load_manifest(_with_anomaly(tmp_path, _record()), "onnx")
    assert m.anomaly is not None and m.anomaly.default_method == "typicality" and m.anomaly.k == 256
    assert set(m.anomaly.methods) == {"nll", "typicality", "combined"}
    assert m.anomaly.methods["combined"].complexity_reference == TypicalityReference(-300.0, 5.0, 30.0)
    assert m.anomaly.methods["typicality"].typicality == TypicalityReference(80.0, 10.0, 40.0)
    assert m.anomaly.methods["nll"].scores == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("bad", [
    {"default_method": "complexity"},  # no calibration for it
    {"alpha": 1.5},
    {"methods": {"nll": {"scores": [3.0, 1.0]}}, "default_method": "nll"},  # not sorted
    {"methods": {"nll": {"scores": [1.0], "n": 2}}, "default_method": "nll"},
    {"methods": {"likelihood_ratio": {"scores": [1.0]}}, "default_method": "likelihood_ratio"},  # no graph
])
def test_bad_anomaly_records_are_refused(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ArtifactError):
        load_manifest(_with_anomaly(tmp_path, _record(**bad)), "onnx")


def _latent_record(bank_file: str = LATENT_BANK_FILE) -> dict:
    fisher_reference = {name: [0.0, 1.0, 2.0] for name in anomaly.FISHER_STATISTICS}
    return _record(methods={
        "latent_knn": calibration_record("latent_knn", [0.5, 1.0]),
        "fisher": calibration_record("fisher", [1.0, 2.0, 3.0], fisher_reference=fisher_reference,
                                     transforms=list(transform_names(28, 28))),
    }, default_method="fisher", latent_bank={"file": bank_file, "n": 6, "dim": 32})


def test_manifest_latent_bank_and_fisher_reference_are_parsed(tmp_path: Path) -> None:
    bank = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)  # mnist-vae/1 has latent_dim 32
    m = load_manifest(_with_anomaly(tmp_path, _latent_record(), bank), "onnx")
    assert m.anomaly is not None and m.anomaly.default_method == "fisher"
    fisher = m.anomaly.methods["fisher"]
    np.testing.assert_array_equal(fisher.latent_bank.vectors, bank)
    np.testing.assert_array_equal(m.anomaly.methods["latent_knn"].latent_bank.vectors, bank)
    assert fisher.fisher_reference == {name: (0.0, 1.0, 2.0) for name in anomaly.FISHER_STATISTICS}
    out = score_and_test("latent_knn", m.anomaly.methods["latent_knn"], 0.5, np.zeros(1),
                         latent_mean=bank[:1] + 0.5)  # distance 0.5 * sqrt(32) from the first code
    assert out[0].score == pytest.approx(0.5 * math.sqrt(32)) and out[0].is_anomaly


@pytest.mark.parametrize("case", ["no_checksum", "wrong_dim", "nan", "outside", "tails", "old_statistics",
                                  "transforms"])
def test_bad_latent_banks_are_refused(tmp_path: Path, case: str) -> None:
    bank = np.zeros((6, 32), dtype=np.float32)
    record = _latent_record()
    if case == "wrong_dim":
        bank = np.zeros((6, 3), dtype=np.float32)
    if case == "nan":
        bank[2, 2] = np.nan
    if case == "outside":
        record = _latent_record("../../../etc/passwd")
    if case == "tails":
        record["methods"]["fisher"]["statistics"]["latent_knn"]["tail"] = "two_sided"
    if case == "old_statistics":  # an export with the latent-distance orientation statistic: re-export it
        stats = record["methods"]["fisher"]["statistics"]
        stats["orientation"] = stats.pop("orientation_gain")
    if case == "transforms":
        record["methods"]["fisher"]["transforms"] = ["hflip", "vflip"]
    with pytest.raises(ArtifactError):
        load_manifest(_with_anomaly(tmp_path, record, bank, checksum=case != "no_checksum"), "onnx")
