"""service/anomaly.py against hand computations: p-values, thresholds, the conformal false-alarm
guarantee, typicality's two sides, complexity in nats, likelihood ratios; and the manifest's
`anomaly` record as service/artifacts.py parses it."""

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
    MethodCalibration,
    TypicalityReference,
    anomaly_scores,
    calibration_record,
    complexity_nats,
    conformal_p_values,
    conformal_threshold,
    false_alarm_bound,
    is_anomaly,
    score_and_test,
)
from service.artifacts import ArtifactError, load_manifest

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


@pytest.mark.parametrize("method, kwargs", [
    ("complexity", {}), ("likelihood_ratio", {}), ("typicality", {}), ("nope", {}),
    ("likelihood_ratio", {"background_nll": np.ones(3)}),
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
    with pytest.raises(AnomalyError):
        score_and_test("typicality", cal, 0.05, np.ones(1))


def test_calibration_record() -> None:
    rec = calibration_record("typicality", [3.0, 1.0, 2.0], TypicalityReference(1.0, 2.0, 3.0), note="x")
    assert rec["scores"] == [1.0, 2.0, 3.0] and rec["n"] == 3 and rec["note"] == "x"
    assert rec["reference"] == {"center": 1.0, "scale_low": 2.0, "scale_high": 3.0}
    with pytest.raises(AnomalyError):
        calibration_record("nll", [1.0, math.inf])


# -- the manifest record -------------------------------------------------------------------------------
def test_mnist_vae_1_still_loads_without_anomaly_record() -> None:
    m = load_manifest(REPO_ROOT / "models" / "mnist-vae" / "1", "onnx")
    assert m.anomaly is None and m.calibration is not None and "background_log_weights" not in m.graphs


def _with_anomaly(models: Path, record: dict) -> Path:
    """mnist-vae/1's manifest (graphs not copied: only files listed stay verified) plus an anomaly record."""
    directory = models / "mnist-vae" / "9"
    directory.mkdir(parents=True)
    src = REPO_ROOT / "models" / "mnist-vae" / "1"
    raw = json.loads((src / "manifest.json").read_text())
    for name in ("log_weights.onnx",):
        (directory / name).write_bytes((src / name).read_bytes())
    raw["files"] = {"log_weights.onnx": raw["files"]["log_weights.onnx"]}
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
