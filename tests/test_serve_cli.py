"""`python serve.py`: configuration, start-up errors, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir

from facemask.serving.settings import ServeSettings
from facemask.settings import configure_environment, project_root
from tests.conftest import TrainedModel

# The serve config resolves its paths from $FACEMASK_ROOT, which serve.py sets.
configure_environment()

SERVE_SCRIPT = project_root() / "serve.py"
PHOTO = "no_mask/0_0_aidai_0014.jpg"
START_TIMEOUT_S = 120
CONCURRENT_REQUESTS = 40


def _compose_serve(overrides: list[str]):
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return compose(config_name="serve", overrides=overrides)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    prediction_log: Path
    output: Path
    cwd: Path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "models:/facemask-classifier@champion"),
        (["model.alias=challenger"], "models:/facemask-classifier@challenger"),
        (["model.version=3"], "models:/facemask-classifier/3"),
        (["model.uri=runs:/abc/model", "model.version=3"], "runs:/abc/model"),
    ],
)
def test_config_builds_model_uri(overrides: list[str], expected: str):
    settings = ServeSettings.from_config(_compose_serve(overrides))

    assert settings.model_uri == expected
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"
    assert settings.prediction_log == project_root() / "logs" / "predictions.jsonl"


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="max_upload_bytes"):
        ServeSettings.from_config(_compose_serve(["max_upload_bytes=0"]))
    with pytest.raises(ValueError, match="port"):
        ServeSettings.from_config(_compose_serve(["port=70000"]))
    with pytest.raises(ValueError, match="runtime='tensorrt' is invalid"):
        ServeSettings.from_config(_compose_serve(["runtime=tensorrt"]))
    with pytest.raises(ValueError, match="torch_dtype"):
        ServeSettings.from_config(_compose_serve(["torch_dtype=float16"]))
    with pytest.raises(ValueError, match="batching.max_batch_size"):
        ServeSettings.from_config(_compose_serve(["batching.max_batch_size=0"]))
    with pytest.raises(ValueError, match="batching.max_wait_ms"):
        ServeSettings.from_config(_compose_serve(["batching.max_wait_ms=-1"]))


def test_config_reads_runtime_and_batching():
    settings = ServeSettings.from_config(
        _compose_serve(
            [
                "runtime=torch",
                "torch_dtype=bfloat16",
                "batching.max_batch_size=8",
                "batching.max_wait_ms=3.5",
            ]
        )
    )
    defaults = ServeSettings.from_config(_compose_serve([]))

    assert settings.runtime == "torch"
    assert settings.torch_dtype == "bfloat16"
    assert settings.max_batch_size == 8
    assert settings.max_batch_wait_ms == 3.5
    assert defaults.runtime == "auto"
    assert defaults.torch_dtype == "float32"
    assert defaults.inference_workers == 1


def _run_serve(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SERVE_SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_alias_exits_2(trained_model: TrainedModel, tmp_path: Path):
    result = _run_serve(
        [f"mlflow.tracking_uri={trained_model.tracking_uri}", "model.alias=missing"],
        cwd=tmp_path,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "models:/facemask-classifier@missing" in output
    assert trained_model.tracking_uri in output
    assert "python train.py" in output
    assert "model.version=N" in output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(error_lines) == 1
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def run_server(
    base: Path, model_uri: str, tracking_uri: str, overrides: tuple[str, ...] = ()
) -> Iterator[Server]:
    """Start `python serve.py` on a free port, wait until GET /ready returns 200, kill it after.

    `overrides` are more Hydra overrides of conf/serve.yaml, such as `runtime=onnx`.
    """
    cwd = base / "cwd"
    cwd.mkdir()
    port = _free_port()
    prediction_log = base / "logs" / "predictions.jsonl"
    output = base / "server.out"
    args = [
        sys.executable,
        str(SERVE_SCRIPT),
        f"model.uri={model_uri}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"port={port}",
        f"prediction_log.path={prediction_log}",
        *overrides,
    ]
    with output.open("w") as out:
        process = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base_url, output)
        yield Server(process, base_url, prediction_log, output, cwd)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained_model: TrainedModel, tmp_path_factory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    with run_server(base, trained_model.alias_uri, trained_model.tracking_uri) as started:
        yield started


def _wait_ready(process: subprocess.Popen, base_url: str, output: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve.py exited with {process.returncode}:\n{output.read_text()}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"serve.py was not ready within {START_TIMEOUT_S} s:\n{output.read_text()}")


def _log_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_server_answers_over_http(server: Server, real_data_root: Path):
    photo = (real_data_root / PHOTO).read_bytes()
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        health = client.get("/health")
        info = client.get("/info").json()
        prediction = client.post("/predict", files={"file": ("photo.jpg", photo, "image/jpeg")})
        bad = client.post("/predict", files={"file": ("notes.txt", b"plain text", "text/plain")})
        metrics = client.get("/metrics").text

    assert health.status_code == 200
    assert info["classes"] == ["mask", "no_mask"]
    assert prediction.status_code == 200
    body = prediction.json()
    assert body["mask"] + body["no_mask"] == pytest.approx(1.0, abs=1e-5)
    assert body["request_id"] == prediction.headers["X-Request-ID"]
    assert bad.status_code == 415
    assert bad.json()["error"]["code"] == "unsupported_image"
    assert 'facemask_http_requests_total{endpoint="/predict",method="POST",status="200"}' in metrics
    assert body["request_id"] in {r["request_id"] for r in _log_records(server.prediction_log)}


def test_server_logs_each_concurrent_prediction_once(server: Server, real_data_root: Path):
    photo = (real_data_root / PHOTO).read_bytes()
    before = {r["request_id"] for r in _log_records(server.prediction_log)}

    def post(index: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            return client.post(
                "/predict",
                files={"file": (f"{index}.jpg", photo, "image/jpeg")},
                headers={"X-Request-ID": f"concurrent-{index}"},
            )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(CONCURRENT_REQUESTS), timeout=120))

    accepted = [r.json()["request_id"] for r in responses if r.status_code == 200]
    assert len(accepted) == CONCURRENT_REQUESTS
    logged = [r["request_id"] for r in _log_records(server.prediction_log)]
    new = [request_id for request_id in logged if request_id not in before]
    assert sorted(new) == sorted(accepted)


def test_server_stops_on_sigterm(server: Server):
    os.kill(server.process.pid, signal.SIGTERM)
    returncode = server.process.wait(timeout=60)

    output = server.output.read_text()
    assert returncode == 128 + signal.SIGTERM, output
    assert "Starting the prediction service" in output
    assert "Stopped the prediction service" in output
    assert "SIGTERM" in output
    assert "Traceback" not in output
    assert list(server.cwd.iterdir()) == []
