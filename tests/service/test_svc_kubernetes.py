"""deploy/kubernetes: the manifests agree with the service, the image and each other.

Read with pyyaml only (no cluster): probes hit the service's real paths on the container's port, the
GPU is a limit, the grace period outlasts the drain, the HPA scales the Deployment on the gauge the
service exports, every VAE_* variable is a setting the service accepts, and every field is one the
Kubernetes / KServe API types know (a misspelt field would be dropped silently by the API server).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKER_UID = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())


def _docs(relative: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / relative).read_text()) if doc]


def _one(relative: str, kind: str) -> dict[str, Any]:
    [doc] = [d for d in _docs(relative) if d["kind"] == kind]
    return doc


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _port(container: dict[str, Any], ref: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as the container port number."""
    if isinstance(ref, int):
        return ref
    [port] = [p["containerPort"] for p in container["ports"] if p.get("name") == ref]
    return port


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _one("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


# -- schema: every key is a field of the API type ---------------------------------------------------------
MANIFESTS = {
    "deployment.yaml": "V1Deployment", "service.yaml": "V1Service", "hpa.yaml": "V2HorizontalPodAutoscaler",
    "pdb.yaml": "V1PodDisruptionBudget", "models-pvc.yaml": "V1PersistentVolumeClaim",
    "kserve/inferenceservice.yaml": "V1beta1InferenceService",
    "kserve/servingruntime.yaml": "V1alpha1ServingRuntime",
}
FREE_FORM = ("str", "int", "bool", "float", "object", "datetime")  # IntOrString, Quantity... are `object`


def _model_class(name: str) -> Any:
    """The Kubernetes Python client's model class of that name, else KServe's (kserve depends on both)."""
    for module in ("kubernetes.client.models", "kserve.models"):
        cls = getattr(pytest.importorskip(module), name, None)
        if cls is not None:
            return cls
    raise AssertionError(f"no API type {name}")


def _unknown_fields(data: Any, type_name: str, path: str) -> list[str]:
    """Paths of keys that the typed API models (kubernetes / kserve Python clients) do not declare."""
    inner = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
    if inner:
        return [bad for i, item in enumerate(data) for bad in _unknown_fields(item, inner[1], f"{path}[{i}]")]
    inner = re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[)\]]", type_name)
    if inner:
        return [bad for k, v in data.items() for bad in _unknown_fields(v, inner[1], f"{path}.{k}")]
    if type_name in FREE_FORM:
        return []
    cls = _model_class(type_name)
    by_json = {json_name: cls.openapi_types[attr] for attr, json_name in cls.attribute_map.items()}
    bad = [f"{path}.{key}" for key in data if key not in by_json]
    return bad + [b for key, value in data.items() if key in by_json
                  for b in _unknown_fields(value, by_json[key], f"{path}.{key}")]


@pytest.mark.parametrize("relative", sorted(MANIFESTS))
def test_manifests_use_only_fields_their_api_types_declare(relative: str) -> None:
    docs = _docs(relative)
    assert docs and all(doc["apiVersion"] and doc["metadata"]["name"] for doc in docs)
    assert _unknown_fields(docs[0], MANIFESTS[relative], relative) == []


def test_the_field_check_catches_a_misspelt_field(deployment: dict[str, Any]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert _unknown_fields(broken, "V1Deployment", "d") == [
        "d.spec.template.spec.containers[0].readinessProbes"]


def test_kustomization_applies_every_plain_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    plain = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert set(kustomization["resources"]) == plain
    assert [image["name"] for image in kustomization["images"]] == ["vae-serve"]


# -- the Deployment ---------------------------------------------------------------------------------------
def test_container_runs_the_service_image_on_one_gpu(container: dict[str, Any]) -> None:
    assert container["image"].split("/")[-1].split(":")[0] == "vae-serve"  # docker compose / Dockerfile image
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    env = _env(container)
    assert env["VAE_DEVICE"] == "cuda" and env["VAE_HOST"] == "0.0.0.0"
    assert int(env["VAE_PORT"]) == _port(container, "http")


def test_probes_use_the_service_paths_on_its_port(container: dict[str, Any]) -> None:
    port = int(_env(container)["VAE_PORT"])
    kinds = ("readinessProbe", "livenessProbe", "startupProbe")
    probes = {kind: container[kind]["httpGet"] for kind in kinds}
    assert probes["readinessProbe"]["path"] == "/readyz"  # 503 while loading and while draining
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert all(_port(container, probe["port"]) == port for probe in probes.values())


def test_models_are_mounted_read_only_and_the_pod_runs_as_the_image_user(deployment: dict[str, Any],
                                                                         container: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == _env(container)["VAE_MODELS_DIR"]]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    claim = _one("models-pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    # the root file system is read-only: uploads and worker sockets go to a writable /tmp
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert DOCKER_UID and pod["securityContext"]["runAsUser"] == int(DOCKER_UID[1]) != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_grace_period_outlasts_the_drain(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    env = _env(container)
    drain = float(env["VAE_DRAIN_DELAY_S"]) + float(env["VAE_DRAIN_TIMEOUT_S"])
    assert drain > 0
    # +10 s: the margin the service itself allows past the drain before it stops on its own
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 10


@pytest.mark.parametrize("relative", ["deployment.yaml", "kserve/servingruntime.yaml"])
def test_environment_variables_are_valid_service_settings(relative: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    containers = [c for doc in _docs(relative) for c in _containers(doc)]
    assert containers
    for name in [n for n in os.environ if n.startswith("VAE_")]:  # only the manifest's values count
        monkeypatch.delenv(name)
    for container in containers:
        for name, value in _env(container).items():
            assert name.startswith("VAE_") and name[4:].lower() in Settings.model_fields, name
            if isinstance(value, str):
                monkeypatch.setenv(name, value)
    settings = Settings()  # the values themselves pass the service's validation
    assert settings.drain_timeout_s > 0


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    return spec.get("template", {}).get("spec", spec).get("containers", [])


# -- Service, HPA, PDB ------------------------------------------------------------------------------------
def test_service_routes_to_the_container_port(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    service = _one("service.yaml", "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert _port(container, port["targetPort"]) == int(_env(container)["VAE_PORT"]) == 8000


def test_hpa_scales_the_deployment_on_requests_in_flight(deployment: dict[str, Any],
                                                         container: dict[str, Any]) -> None:
    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vae_inflight_requests"
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    # scale out well before the service starts answering 429 at its in-flight limit
    assert 0 < float(target["averageValue"]) < int(_env(container)["VAE_MAX_INFLIGHT_REQUESTS"])
    # the gauge exists in the service, and the adapter rule publishes it under the same name
    assert '"vae_inflight_requests"' in (ROOT / "service" / "metrics.py").read_text()
    [rule] = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == "vae_inflight_requests" and "vae_inflight_requests" in rule["seriesQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a per-pod (type: Pods) metric


def test_disruption_budget_covers_the_pods(deployment: dict[str, Any]) -> None:
    pdb = _one("pdb.yaml", "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


# -- KServe -----------------------------------------------------------------------------------------------
def test_kserve_inference_service_runs_the_image_with_the_v2_protocol(container: dict[str, Any]) -> None:
    isvc = _one("kserve/inferenceservice.yaml", "InferenceService")
    runtime = _one("kserve/servingruntime.yaml", "ServingRuntime")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert str(model["resources"]["limits"]["nvidia.com/gpu"]) == "1"

    [server] = runtime["spec"]["containers"]
    assert server["name"] == "kserve-container" and server["image"] == container["image"]
    env = _env(server)
    assert env["VAE_MODELS_DIR"] == "/mnt/models"  # where KServe mounts storageUri
    port = int(env["VAE_PORT"])
    assert server["ports"][0]["containerPort"] == port  # KServe routes to the first port
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert server["securityContext"]["runAsNonRoot"] is True
    # Knative uses the request timeout as the pod's termination grace period
    drain = float(env["VAE_DRAIN_DELAY_S"]) + float(env["VAE_DRAIN_TIMEOUT_S"])
    assert isvc["spec"]["predictor"]["timeout"] > drain + 10
