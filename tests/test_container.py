"""Build the serving image with Podman and run it, alone and as the k8s Deployment.

Marked `container`: run with `pytest -m container`. Needs Podman and the base image that the
Dockerfile names (scripts/podman_base_image.sh makes one where registries cannot be reached).
Environment:
    TORCH_REQUIREMENT: build argument of the same name, for example torch==2.13.0+cpu with the
        matching wheel in wheels/. Unset, the Dockerfile's default is used.
    PIP_CERT: CA bundle for pip inside the build (default /etc/ssl/certs/ca-certificates.crt).
The tests remove the image and containers they create. Podman keeps the builder stage as an
untagged image (about 2.2 GB), so a rerun takes about 1 minute instead of 4; `podman image prune`
removes it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from facemask.settings import project_root
from tests.conftest import TrainedModel
from tests.test_serve_cli import PHOTO, _free_port

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]

ROOT = project_root()
# What the Dockerfile copies; the test builds from a copy with its own exported model. The face
# detector's model file comes with facemask/.
CONTEXT_FILES = (
    "Dockerfile",
    ".dockerignore",
    "serve.py",
    "requirements-serve.txt",
    "requirements-nodeps.in",
    "scripts/pip_check.py",
)
CONTEXT_DIRS = ("facemask", "conf", "wheels")
BUILD_TIMEOUT_S = 1200
READY_TIMEOUT_S = 180
KUBE_ANSWER_SCRIPT = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=5).status)"
)


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def _build_context(target: Path, trained_model: TrainedModel) -> Path:
    from facemask.export import export_model

    for name in CONTEXT_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    for name in CONTEXT_DIRS:
        # Hard links keep the torch wheel in wheels/ from being copied byte by byte.
        shutil.copytree(
            ROOT / name,
            target / name,
            copy_function=os.link,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    export_model(trained_model.alias_uri, target / "build" / "model", trained_model.tracking_uri)
    return target


@pytest.fixture(scope="module")
def image(trained_model: TrainedModel, tmp_path_factory) -> Iterator[str]:
    """Build the image from the working tree with the test model baked in; remove it after."""
    tag = f"localhost/facemask-serve-test:{uuid.uuid4().hex[:8]}"
    context = _build_context(tmp_path_factory.mktemp("context"), trained_model)
    args = ["build", "--format", "docker", "-t", tag]
    if os.environ.get("TORCH_REQUIREMENT"):
        args += ["--build-arg", f"TORCH_REQUIREMENT={os.environ['TORCH_REQUIREMENT']}"]
    ca_bundle = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
    if ca_bundle.is_file():
        args += ["--secret", f"id=pip_ca,src={ca_bundle}"]
    _podman(*args, str(context), timeout=BUILD_TIMEOUT_S)
    try:
        yield tag
    finally:
        _podman("rmi", "--force", tag, check=False)


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, str]]:
    """Run the image with a 2 GB memory and 1 CPU limit on 127.0.0.1; remove it after."""
    name = f"facemask-test-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    _podman(
        "run", "--detach", "--name", name, "--memory", "2g", "--cpus", "1",
        "--publish", f"127.0.0.1:{port}:8000", "--health-interval", "disable", image,
    )  # fmt: skip
    try:
        yield name, f"http://127.0.0.1:{port}"
    finally:
        _podman("rm", "--force", "--time", "0", name, check=False)


def _wait_ready(base_url: str, name: str) -> None:
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        state = _podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            pytest.fail(f"container {name} is {state}:\n{_podman('logs', name).stderr}")
        time.sleep(0.5)
    pytest.fail(f"container {name} was not ready within {READY_TIMEOUT_S} s")


def test_image_lacks_training_packages(image: str):
    script = (
        "import importlib.util as u; "
        "print([m for m in ('lightning', 'pytorch_lightning', 'timm', 'torchvision', "
        "'torchmetrics') if u.find_spec(m)])"
    )
    result = _podman("run", "--rm", "--entrypoint", "python", image, "-c", script)

    assert result.stdout.strip() == "[]"


def test_image_finds_face_without_torch(image: str, real_data_root: Path):
    # The ONNX serving path must stay free of torch, and the face stage is part of it.
    script = (
        "import sys; from PIL import Image; import numpy as np; "
        "from facemask.faces import FaceStage; "
        "rgb = np.asarray(Image.open('/photo.jpg').convert('RGB')); "
        "print(FaceStage().search(rgb).faces, 'torch' in sys.modules)"
    )
    photo = real_data_root / PHOTO
    result = _podman(
        "run", "--rm", "--volume", f"{photo}:/photo.jpg:ro", "--entrypoint", "python", image,
        "-c", script,
    )  # fmt: skip
    faces, torch_loaded = result.stdout.split()

    assert int(faces) >= 1, result.stdout + result.stderr
    assert torch_loaded == "False", result.stdout + result.stderr


def test_container_serves_and_stops_cleanly(container: tuple[str, str], real_data_root: Path):
    name, base_url = container
    _wait_ready(base_url, name)
    photo = (real_data_root / PHOTO).read_bytes()
    with httpx.Client(base_url=base_url, timeout=60) as client:
        classes = client.get("/info").json()["classes"]
        response = client.post("/predict", files={"file": ("photo.jpg", photo, "image/jpeg")})
    user_id = _podman("exec", name, "id", "-u").stdout.strip()
    health = _podman("healthcheck", "run", name, check=False)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in classes
    assert math.isclose(sum(body[c] for c in classes), 1.0, abs_tol=1e-5)
    assert user_id.isdigit()
    assert user_id != "0"
    assert health.returncode == 0, health.stdout + health.stderr

    _podman("stop", "--time", "30", name)
    exit_code = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = _podman("logs", name)
    output = logs.stdout + logs.stderr
    assert exit_code == str(128 + signal.SIGTERM), output
    assert "Stopped the prediction service" in output
    assert "SIGTERM" in output
    assert "Traceback" not in output


def _kube_copy(image: str, target: Path, suffix: str) -> Path:
    """Write the Deployment without ports (no host port clashes) and with unique volumes."""
    deployment = yaml.safe_load((ROOT / "k8s" / "deployment.yaml").read_text())
    deployment["metadata"]["name"] += f"-{suffix}"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container.pop("ports")
    container["image"] = image
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["port"] = 8000
    # Podman turns emptyDir volumes into named volumes; unique names avoid touching others.
    renamed = {volume["name"]: f"{volume['name']}-{suffix}" for volume in pod["volumes"]}
    for volume in pod["volumes"]:
        volume["name"] = renamed[volume["name"]]
    for mount in container["volumeMounts"]:
        mount["name"] = renamed[mount["name"]]
    path = target / "deployment.yaml"
    path.write_text(yaml.safe_dump(deployment))
    return path


def _answering_replicas(containers: list[str]) -> set[str]:
    answering = set()
    for name in containers:
        result = _podman("exec", name, "python", "-c", KUBE_ANSWER_SCRIPT, check=False)
        if result.returncode == 0 and result.stdout.strip() == "200":
            answering.add(name)
    return answering


def test_kube_play_runs_both_replicas(image: str, tmp_path: Path):
    suffix = uuid.uuid4().hex[:8]
    manifest = _kube_copy(image, tmp_path, suffix)
    _podman("kube", "play", str(manifest), timeout=300)
    try:
        pods = _podman(
            "pod", "ps", "--filter", f"name=-{suffix}-pod-", "--format", "{{.Name}}"
        ).stdout.split()
        containers = [f"{pod}-serve" for pod in pods]
        # Requests go to 127.0.0.1 inside each pod's own network namespace.
        deadline = time.monotonic() + READY_TIMEOUT_S
        answering: set[str] = set()
        while time.monotonic() < deadline and answering != set(containers):
            answering = _answering_replicas(containers)
            time.sleep(1)
        user_ids = {_podman("exec", c, "id", "-u").stdout.strip() for c in containers}
    finally:
        _podman("kube", "down", str(manifest), timeout=120, check=False)
        for volume in ("prediction-log", "tmp"):
            _podman("volume", "rm", "--force", f"{volume}-{suffix}", check=False)

    assert len(pods) == 2
    assert answering == set(containers)
    assert "0" not in user_ids
