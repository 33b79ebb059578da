"""Deployment files, checked offline: Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), the KServe resources against the fields
of KServe's CRDs that we use, and the images' and compose file's promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.33.0"


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}", d) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _documents(p)]


@pytest.mark.parametrize(("name", "manifest"), _manifests(), ids=[n for n, _ in _manifests()])
def test_kubernetes_manifests_are_valid(name, manifest):
    kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_the_validator_catches_mistakes():
    deployment = copy.deepcopy(next(d for _, d in _manifests() if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_deployment_keeps_its_promises():
    kinds = {d["kind"]: d for _, d in _manifests()}
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_user()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
    grace = int(next(e["value"] for e in container["env"] if e["name"] == "RNNSERVE_GRACE_PERIOD_S"))
    assert grace < pod["terminationGracePeriodSeconds"], "the server must finish draining before the kill"
    labels = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert kinds["Service"]["spec"]["selector"] == labels
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
    assert target == kinds["Deployment"]["metadata"]["name"]
    assert "session" in (DEPLOY / "k8s" / "service.yaml").read_text().lower()


# The fields of KServe's CRDs (serving.kserve.io, v0.14) that our resources use, with their types.
_CONTAINER = {"type": "object"}
SERVING_RUNTIME = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"}, "kind": {"const": "ServingRuntime"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["supportedModelFormats", "containers"],
            "properties": {
                "supportedModelFormats": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "autoSelect": {"type": "boolean"}, "priority": {"type": "integer"}}}},
                "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                "multiModel": {"type": "boolean"},
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
            },
        },
    },
}
INFERENCE_SERVICE = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["predictor"], "properties": {
            "predictor": {"type": "object", "additionalProperties": False, "required": ["model"], "properties": {
                "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
                "model": {"type": "object", "additionalProperties": False, "required": ["modelFormat"], "properties": {
                    "modelFormat": {"type": "object", "additionalProperties": False, "required": ["name"],
                                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
                    "runtime": {"type": "string"},
                    "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                    "storageUri": {"type": "string"},
                    "resources": {"type": "object"},
                }},
            }},
        }},
    },
}


def test_kserve_resources_use_the_crd_fields_correctly():
    (runtime,) = _documents(DEPLOY / "kserve" / "servingruntime.yaml")
    (service,) = _documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    jsonschema.validate(runtime, SERVING_RUNTIME)
    jsonschema.validate(service, INFERENCE_SERVICE)
    # The runtime's container is a Kubernetes container: validate it inside a Pod.
    for container in runtime["spec"]["containers"]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [container]}}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    args = runtime["spec"]["containers"][0]["args"]
    assert args[args.index("--models") + 1] == "/mnt/models"
    with pytest.raises(jsonschema.ValidationError):
        broken = copy.deepcopy(service)
        broken["spec"]["predictor"]["model"]["protocol"] = "v2"
        jsonschema.validate(broken, INFERENCE_SERVICE)


def _dockerfile_user() -> int:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    return int(re.search(r"^USER (\d+)", text, re.M).group(1))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_are_non_root_with_a_grpc_health_check(name):
    text = (DEPLOY / "docker" / name).read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert text.count("\nFROM ") >= 2, "multi-stage"
    assert _dockerfile_user() != 0 and re.search(r"^USER 10001", text, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["rnnserve", "health"\]', text, re.M)
    assert re.search(r"^EXPOSE 50051 8002", text, re.M)
    assert re.search(r'^ENTRYPOINT \["rnnserve", "serve"\]', text, re.M)
    assert "RNNSERVE_HOST=0.0.0.0" in text and "COPY models /models" in text
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "[train" not in instructions and "torch" not in instructions, "serving dependencies only"
    assert "/run/host-ca.crt" not in text, "no build host's CA bundle in the image"


def test_the_build_context_is_only_what_the_images_copy():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else -1] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for name in ("Dockerfile", "Dockerfile.cuda"):
        for line in (DEPLOY / "docker" / name).read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                copied.update(part.rstrip("/") for part in line.split()[1:-1])
    assert copied <= allowed


def test_compose_runs_the_image_on_loopback_with_optional_prometheus():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    server = compose["services"]["rnnserve"]
    assert server["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert all(port.startswith("127.0.0.1:") for port in server["ports"])
    assert server["read_only"] is True
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["rnnserve:8002"]
