"""`facemask export`, serving an exported folder offline, and the deployment scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from facemask.export import main as export_main
from facemask.serving.model_store import ModelLoadError, load_model_bundle
from facemask.settings import project_root
from tests.conftest import TrainedModel
from tests.test_serve_cli import PHOTO, Server, _free_port, run_server

SCRIPTS = project_root() / "scripts"
# A tracking URI that cannot be opened: loading an exported folder must not need one.
UNREACHABLE_TRACKING_URI = "sqlite:////nonexistent/mlflow.db"


@pytest.fixture(scope="module")
def exported(trained_model: TrainedModel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    status = export_main(
        [trained_model.alias_uri, "--out", str(out), "--tracking-uri", trained_model.tracking_uri]
    )
    assert status == 0
    return out


def test_export_writes_model_and_registry_info(exported: Path, trained_model: TrainedModel):
    info = json.loads((exported / "facemask_export.json").read_text())

    assert (exported / "MLmodel").is_file()
    assert any((exported / "data").iterdir())
    assert info["name"] == trained_model.model_name
    assert info["version"] == trained_model.version
    assert info["alias"] == trained_model.alias
    assert info["run_id"] == trained_model.run_id
    assert info["pinned_uri"] == f"models:/{trained_model.model_name}/{trained_model.version}"
    assert "test/acc" in info["test_metrics"]


def test_export_refuses_existing_folder(exported: Path, trained_model: TrainedModel):
    before = sorted(path.name for path in exported.iterdir())
    status = export_main(
        [
            trained_model.alias_uri,
            "--out",
            str(exported),
            "--tracking-uri",
            trained_model.tracking_uri,
        ]
    )

    assert status == 2
    assert sorted(path.name for path in exported.iterdir()) == before


def test_export_missing_alias_leaves_nothing(trained_model: TrainedModel, tmp_path: Path):
    out = tmp_path / "model"
    uri = f"models:/{trained_model.model_name}@missing"
    status = export_main([uri, "--out", str(out), "--tracking-uri", trained_model.tracking_uri])

    assert status == 2
    assert list(tmp_path.iterdir()) == []


def test_folder_loads_without_tracking_store(
    exported: Path, trained_model: TrainedModel, tmp_path: Path, monkeypatch
):
    import mlflow

    # Point MLflow's global store at a path that cannot exist, so any tracking call fails. MLflow 3
    # would otherwise create ./mlflow.db when code queries the default tracking store.
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(UNREACHABLE_TRACKING_URI)
    try:
        bundle = load_model_bundle(str(exported), UNREACHABLE_TRACKING_URI)
    finally:
        mlflow.set_tracking_uri(previous)

    assert bundle.version == trained_model.version
    assert bundle.name == trained_model.model_name
    assert bundle.run_id == trained_model.run_id
    assert bundle.class_names == ["mask", "no_mask"]
    assert bundle.test_metrics
    assert list(tmp_path.iterdir()) == []


def test_folder_without_mlmodel_is_rejected(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="MLmodel") as info:
        load_model_bundle(str(tmp_path), UNREACHABLE_TRACKING_URI)

    assert "facemask export" in str(info.value)


@pytest.fixture(scope="module")
def folder_server(exported: Path, tmp_path_factory) -> Iterator[Server]:
    """Serve the exported folder with an unusable tracking URI; stop the server after."""
    base = tmp_path_factory.mktemp("folder-server")
    with run_server(base, str(exported), UNREACHABLE_TRACKING_URI) as started:
        yield started


def _run_script(name: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_verify_deployment_accepts_served_folder(folder_server: Server, real_data_root: Path):
    result = _run_script(
        "verify_deployment.py",
        [folder_server.base_url, "--image", str(real_data_root / PHOTO), "--wait", "10"],
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "is healthy" in result.stderr


def test_verify_deployment_fails_without_server(real_data_root: Path):
    url = f"http://127.0.0.1:{_free_port()}"
    result = _run_script(
        "verify_deployment.py", [url, "--image", str(real_data_root / PHOTO), "--wait", "1"], 30
    )

    assert result.returncode == 1
    assert "did not return 200" in result.stderr


def test_load_test_reports_without_errors(folder_server: Server, real_data_root: Path):
    result = _run_script(
        "load_test.py",
        [
            "--url", folder_server.base_url,
            "--image", str(real_data_root / PHOTO),
            "--duration", "3",
            "--requests", "2000",
            "--concurrency", "4",
            "--json",
        ],
        timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] > 0
    assert report["ok"] == report["requests"]
    assert report["errors"] == {}
    assert report["stopped_by"] == "duration"
    assert report["throughput_rps"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    logged = folder_server.prediction_log.read_text().splitlines()
    assert len(logged) >= report["ok"]


def test_load_test_counts_failed_requests(folder_server: Server, tmp_path: Path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    result = _run_script(
        "load_test.py",
        ["--url", folder_server.base_url, "--image", str(text_file), "--requests", "5", "--json"],
        timeout=60,
    )

    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["requests"] == 5
    assert report["ok"] == 0
    assert report["errors"] == {"415": 5}
    assert report["stopped_by"] == "requests"
