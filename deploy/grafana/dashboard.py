"""The Grafana dashboard of the service, defined once here and written to deploy/grafana/vae-serve.json.

    python deploy/grafana/dashboard.py          # rewrite vae-serve.json (tests check it is up to date)

Every query names metrics the service exports (service/metrics.py); tests/service/test_svc_dashboards.py
checks each name and label against a running app's /metrics. Import the JSON in Grafana (Dashboards >
Import) and pick the Prometheus data source that scrapes the service's /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("vae-serve.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
MODEL = 'model=~"$model"'


def panel(title: str, targets: list[tuple[str, str]], unit: str, description: str, *,
          kind: str = "timeseries", width: int = 12, stack: bool = False) -> dict[str, Any]:
    """One panel; targets are (PromQL, legend) pairs."""
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                              "stacking": {"mode": "normal" if stack else "none"}}
    return {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, **({"custom": custom} if kind == "timeseries" else {})},
                        "overrides": []},
        "options": ({"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                     "tooltip": {"mode": "multi"}} if kind == "timeseries"
                    else {"reduceOptions": {"calcs": ["lastNotNull"]}}),
        "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
        "_width": width,
    }


def quantile(q: float, metric: str, by: str, selector: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Traffic and errors", [
        panel("Request rate by route", [
            (f'sum by (endpoint) (rate(vae_requests_total{{endpoint!="unmatched"}}[{RATE}]))',
             "{{endpoint}}")],
            "reqps", "HTTP requests per second, by route template (every protocol).", stack=True),
        panel("Responses by status class", [
            (f'sum by (status) (rate(vae_requests_total{{status=~"4..|5.."}}[{RATE}]))', "{{status}}")],
            "reqps", "4xx and 5xx answers per second. 429 = overload (answered at once with Retry-After), "
                     "503 = not ready or draining, 504 = deadline."),
        panel("Latency p50 / p99 by route", [
            (quantile(0.5, "vae_request_duration_seconds", "endpoint", 'status="200"'), "p50 {{endpoint}}"),
            (quantile(0.99, "vae_request_duration_seconds", "endpoint", 'status="200"'), "p99 {{endpoint}}")],
            "s", "End-to-end latency of successful requests, measured in the HTTP workers."),
        panel("Requests in flight", [("sum(vae_inflight_requests)", "in flight"),
                                     ("sum(vae_inflight_requests_peak)", "peak (upper bound)")],
              "short", "Model requests being handled now, summed over HTTP workers (the HPA's metric)."),
    ]),
    ("Engine: queue, compute, batches", [
        panel("Queue wait vs compute time (p99) by graph", [
            (quantile(0.99, "vae_queue_duration_seconds", "graph", MODEL), "queue {{graph}}"),
            (quantile(0.99, "vae_compute_duration_seconds", "graph", MODEL), "compute {{graph}}")],
            "s", "Queue: time a submission waited before its first rows ran. Compute: one batch on the "
                 "device. Queue >> compute means the device is saturated."),
        panel("Rows per batch", [
            (f"sum by (graph) (rate(vae_batch_size_rows_sum{{{MODEL}}}[{RATE}])) / "
             f"sum by (graph) (rate(vae_batch_size_rows_count{{{MODEL}}}[{RATE}]))", "mean {{graph}}"),
            (quantile(0.9, "vae_batch_size_rows", "graph", MODEL), "p90 {{graph}}")],
            "short", "Dynamic batching at work: rows per executed batch."),
        panel("Queue depth and limit", [
            (f"sum by (graph) (vae_queue_depth_rows{{{MODEL}}})", "depth {{graph}}"),
            (f"max by (graph) (vae_queue_limit_rows{{{MODEL}}})", "limit {{graph}}")],
            "short", "Rows waiting per graph; admission refuses beyond the limit."),
        panel("Rejections and batch failures", [
            (f"sum by (reason) (rate(vae_rejections_total{{{MODEL}}}[{RATE}]))", "refused: {{reason}}"),
            (f"sum by (graph) (rate(vae_batch_failures_total{{{MODEL}}}[{RATE}]))",
             "failed batches {{graph}}")],
            "ops", "Submissions refused by the engine (queue_full, too_expensive, deadline_estimate, "
                   "deadline) "
                   "and batches that raised in the runtime."),
    ]),
    ("Models and anomalies", [
        panel("Anomaly rate by model and method", [
            (f"sum by (model, method) (rate(vae_anomaly_flagged_images_total{{{MODEL}}}[{RATE}])) / "
             f"sum by (model, method) (rate(vae_anomaly_scored_images_total{{{MODEL}}}[{RATE}]))",
             "{{model}} {{method}}")],
            "percentunit", "Fraction of scored images flagged (p_value <= alpha). Conformal calibration "
                           "keeps it near alpha (default 1 %) on normal data: a jump usually means drift "
                           "upstream."),
        panel("Images scored per second", [
            (f"sum by (model, method) (rate(vae_anomaly_scored_images_total{{{MODEL}}}[{RATE}]))",
             "{{model}} {{method}}")],
            "ops", "Anomaly decisions per second (the denominator of the anomaly rate)."),
        panel("Models ready", [("max by (model, version, runtime, device) (vae_model_ready{" + MODEL + "})",
                                "{{model}}/{{version}} {{runtime}} {{device}}"),
                               ("max by (model, version) (vae_model_refused{" + MODEL + "})",
                                "refused {{model}}/{{version}}")],
              "short", "1 when a model version is loaded and warmed up; refused = its artifact failed "
                       "checks.",
              kind="stat", width=24),
    ]),
]


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, panel_id = 0, 1
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": panel_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x = panel_id + 1, y + 1, 0
        for p in row_panels:
            width = p["_width"]
            if x + width > 24:
                x, y = 0, y + 8
            fields = {key: value for key, value in p.items() if key != "_width"}
            panels.append({**fields, "id": panel_id, "gridPos": {"h": 8, "w": width, "x": x, "y": y}})
            panel_id, x = panel_id + 1, x + width
        y += 8
    return {
        "uid": "vae-serve", "title": "vae-serve", "tags": ["vae-serve"], "timezone": "browser",
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            {"name": "model", "label": "Model", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(vae_model_ready, model)", "refId": "model"},
             "definition": "label_values(vae_model_ready, model)", "includeAll": True, "multi": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
