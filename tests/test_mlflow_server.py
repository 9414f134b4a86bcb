"""An `mlflow server` on the training store shows the run and the registered model over REST."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT_S = 90
# No proxy: the requests go only to the server started here.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(base: str, path: str, params: dict | None = None, body: dict | None = None) -> dict:
    url = f"{base}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_until_healthy(process: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with _OPENER.open(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    # The server runs its workers as children in its own session, whose process group id is its pid.
    group = process.pid
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # Workers left behind by the server would keep the port; ProcessLookupError means none are.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


@pytest.fixture
def mlflow_server(tmp_path, trained_model):
    """Yield the base URL of an `mlflow server` on the trained model's store, then stop it."""
    port = _free_port()
    log_path = tmp_path / "mlflow-server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        trained_model.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_healthy(process, base, log_path)
        yield base
    finally:
        _stop(process)
    assert process.returncode is not None


def test_server_lists_run_and_model(mlflow_server, trained_model):
    experiment = _request(
        mlflow_server,
        "/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "facemask"},
    )["experiment"]
    runs = _request(
        mlflow_server,
        "/api/2.0/mlflow/runs/search",
        body={"experiment_ids": [experiment["experiment_id"]], "max_results": 100},
    )["runs"]
    # Other tests may add runs to the shared store, so look for the trained model's run.
    matching = [run for run in runs if run["info"]["run_id"] == trained_model.run_id]
    assert len(matching) == 1
    run = matching[0]
    assert run["info"]["status"] == "FINISHED"
    metric_keys = {metric["key"] for metric in run["data"]["metrics"]}
    assert "test/acc" in metric_keys

    model = _request(
        mlflow_server,
        "/api/2.0/mlflow/registered-models/get",
        params={"name": trained_model.model_name},
    )["registered_model"]
    aliases = {entry["alias"]: entry["version"] for entry in model["aliases"]}
    assert aliases == {trained_model.alias: str(trained_model.version)}

    version = _request(
        mlflow_server,
        "/api/2.0/mlflow/registered-models/alias",
        params={"name": trained_model.model_name, "alias": trained_model.alias},
    )["model_version"]
    assert version["run_id"] == trained_model.run_id
