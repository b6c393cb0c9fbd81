"""The operators' files: the Grafana dashboard (deploy/grafana) and the Prometheus alert rules
(deploy/prometheus) name only metrics and labels the service really exports, checked against a running
app's /metrics after real requests; their structure is what Grafana and Prometheus load; the committed
dashboard JSON is what deploy/grafana/dashboard.py writes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from svc_helpers import digit_png, grey_arrays

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "vae-serve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Added by Prometheus at scrape time, or the histogram bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}
FUNCTIONS = {"rate", "increase", "sum", "max", "min", "histogram_quantile", "clamp_min", "label_values",
             "humanizePercentage"}
KEYWORDS = {"by", "and", "offset", "or", "unless", "without", "up"}
DURATION = re.compile(r"\[(?:[0-9]+[smhdw]|\$__rate_interval)\]")


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@pytest.fixture(scope="module")
def exported(client: TestClient) -> dict[str, set[str]]:
    """Series name -> its label names, for every family a running app's /metrics declares. Labels come
    from the samples after real requests, and from the collectors' definitions for the families those
    requests leave without samples (rejections, refused models)."""
    files = [("images", (f"{i}.png", digit_png(seed=i), "image/png")) for i in range(2)]
    client.post("/v1/models/tiny/encode", files=files)
    client.post("/v1/models/tiny/anomaly-score", params={"seed": 0, "alpha": 0.5}, files=files)
    client.post("/v1/models/tiny/log-likelihood", params={"k": 8}, json={"inputs": grey_arrays(1)})
    client.get("/v1/models/nope")
    declared = {c._name: set(c._labelnames) for c in vars(Metrics()).values() if hasattr(c, "_labelnames")}
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        labels = declared.get(family.name, set())  # (the parser also yields the *_created series)
        for suffix in SUFFIXES.get(family.type, ()):
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query and alert rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = dashboard["templating"]["list"]
    found += [(f"variable {v['name']}", v["definition"]) for v in variables if "definition" in v]
    rules = yaml.safe_load(ALERTS.read_text())
    found += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return found


def check_expression(where: str, expr: str, exported: dict[str, set[str]]) -> None:
    for opening, closing in ("()", "[]", "{}"):
        assert expr.count(opening) == expr.count(closing), f"{where}: unbalanced {opening}{closing}: {expr}"
    ranges = re.findall(r"\[[^\]]*\]", expr)
    assert all(DURATION.fullmatch(r) for r in ranges), f"{where}: bad range in {ranges}"
    metrics = set(re.findall(r"\bvae_[a-z_]+\b", expr))
    if re.fullmatch(r'up\{job="[a-z-]+"\} == 0', expr):  # Prometheus's own scrape health series
        return
    assert metrics, f"{where}: names no service metric"
    for metric in metrics:
        assert metric in exported, f"{where}: {metric} is not exported (exported: {sorted(exported)})"
    labels_known = set().union(*(exported[m] for m in metrics)) | SCRAPE_LABELS
    used = set(re.findall(r"([a-z_]+)\s*(?:=~|!=|=)\s*\"", expr))
    for clause in re.findall(r"\bby \(([^)]*)\)", expr):
        used |= {label.strip() for label in clause.split(",")}
    assert used <= labels_known, f"{where}: labels {sorted(used - labels_known)} are not on {sorted(metrics)}"
    words = set(re.findall(r"\b([a-z_]+)\s*\(", expr)) - {"by"}
    assert words <= FUNCTIONS, f"{where}: unknown functions {sorted(words - FUNCTIONS)}"


def test_every_query_and_rule_names_exported_metrics_and_labels(exported: dict[str, set[str]]) -> None:
    found = expressions()
    assert len(found) >= 20
    for where, expr in found:
        check_expression(where, expr, exported)


def test_the_dashboard_covers_what_operators_need_and_loads_in_grafana() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "vae-serve" and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert all(t["refId"] for t in p["targets"])
    text = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needed in ("vae_requests_total", "vae_request_duration_seconds_bucket",
                   "vae_queue_duration_seconds_bucket",
                   "vae_compute_duration_seconds_bucket", "vae_batch_size_rows", "vae_rejections_total",
                   "vae_anomaly_flagged_images_total", "vae_model_ready"):
        assert needed in text, f"no panel shows {needed}"


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("dashboard", DASHBOARD.with_name("dashboard.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run: python deploy/grafana/dashboard.py"


def test_alert_rules_have_the_prometheus_rule_file_shape() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    names = []
    for group in rules["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            if "for" in rule:
                assert re.fullmatch(r"[0-9]+[smh]", rule["for"])
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    # What the issue asks for: 5xx rate, p99, readiness, a jump in the anomaly rate.
    assert {"VaeServeHigh5xxRate", "VaeServeHighP99Latency", "VaeServeNotReady",
            "VaeServeAnomalyRateJump"} <= set(names)


def test_the_anomaly_rate_expression_gives_the_flagged_fraction(client: TestClient) -> None:
    """The counters behind the anomaly-rate panel and alerts: flagged / scored is the fraction of
    is_anomaly answers, the quantity the alert thresholds are about."""
    before = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    def total(families: dict, name: str) -> float:
        if name not in families:
            return 0.0
        return sum(s.value for s in families[name].samples
                   if s.name.endswith("_total") and s.labels.get("model") == "tiny")

    x = [("images", (f"{i}.png", digit_png(seed=10 + i), "image/png")) for i in range(4)]
    answer = client.post("/v1/models/tiny/anomaly-score", params={"seed": 1, "alpha": 0.4}, files=x).json()
    after = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    scored = total(after, "vae_anomaly_scored_images") - total(before, "vae_anomaly_scored_images")
    flagged = total(after, "vae_anomaly_flagged_images") - total(before, "vae_anomaly_flagged_images")
    assert scored == 4
    assert flagged == float(np.sum([r["is_anomaly"] for r in answer["results"]]))
