"""`facemask export --format onnx`, loading the export, and serving it with ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from facemask.data.images import decode_image
from facemask.export import main as export_main
from facemask.serving.model_store import ModelLoadError, load_model_bundle
from facemask.serving.onnx_export import TOLERANCE, OnnxExportError, check_parity
from facemask.serving.preprocessing import EvalPreprocessing
from facemask.serving.runtimes import OnnxModel
from facemask.serving.served_model import (
    ONNX_FILE,
    ONNX_INFO_FILE,
    ONNX_VERSION_TAG,
    load_served_model,
)
from tests.conftest import TrainedModel
from tests.test_serve_cli import PHOTO, Server, run_server

# A tracking URI that cannot be opened: an exported folder must load without one.
UNREACHABLE_TRACKING_URI = "sqlite:////nonexistent/mlflow.db"
# Real photos in the formats of the data set: JPEGs of two sizes (the 4912-pixel-wide one decodes
# through the JPEG draft path), an RGBA PNG, a palette PNG and a WEBP file without an extension.
CHECK_FILES = (
    "no_mask/0_0_aidai_0014.jpg",
    "mask/with_mask104.jpg",
    "mask/Screenshot (251).png",
    "mask/with_mask014.png",
    "mask/black3.jpg_1088Wx1632H",
)
CONCURRENT_REQUESTS = 32


def copy_store(trained_model: TrainedModel, target: Path) -> str:
    """Copy the trained model's MLflow store to `target`; return its tracking URI.

    The SQLite store keeps absolute artifact paths, which are rewritten to the copy, so that
    logging the ONNX export here leaves the session's shared store unchanged.
    """
    shutil.copytree(trained_model.store, target)
    old, new = str(trained_model.store), str(target)
    with sqlite3.connect(target / "mlflow.db") as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            for column in columns:
                db.execute(
                    f"UPDATE {table} SET {column} = replace({column}, ?, ?) "
                    f"WHERE typeof({column}) = 'text' AND {column} LIKE ?",
                    (old, new, f"%{old}%"),
                )
    return f"sqlite:///{target / 'mlflow.db'}"


def _clear_artifact_repo_cache() -> None:
    # MLflow caches each run's artifact repository by run id, whatever the tracking URI, so
    # the copy's run would otherwise write to and read from the original store's folder.
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()


@pytest.fixture(scope="module", autouse=True)
def _separate_artifact_repos() -> Iterator[None]:
    _clear_artifact_repo_cache()
    yield
    _clear_artifact_repo_cache()


@pytest.fixture(scope="module")
def onnx_store(trained_model: TrainedModel, tmp_path_factory) -> str:
    return copy_store(trained_model, tmp_path_factory.mktemp("onnx") / "store")


@pytest.fixture(scope="module")
def onnx_folder(trained_model: TrainedModel, onnx_store: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx-export") / "model"
    status = export_main(
        [
            trained_model.alias_uri,
            "--format",
            "onnx",
            "--out",
            str(out),
            "--tracking-uri",
            onnx_store,
            "--images",
            str(trained_model.data_root),
        ]
    )
    assert status == 0
    return out


def _real_batch(real_data_root: Path, preprocessing: EvalPreprocessing) -> np.ndarray:
    images = [
        decode_image(real_data_root / name, draft_size=preprocessing.draft_size).image
        for name in CHECK_FILES
    ]
    return np.stack([preprocessing.apply(image) for image in images])


def test_export_writes_checked_onnx_model(onnx_folder: Path, trained_model: TrainedModel):
    info = json.loads((onnx_folder / ONNX_INFO_FILE).read_text())

    assert (onnx_folder / ONNX_FILE).is_file()
    assert (onnx_folder / "MLmodel").is_file()
    assert info["class_names"] == ["mask", "no_mask"]
    assert info["preprocessing"]["image_size"] == 64
    assert info["run_id"] == trained_model.run_id
    assert info["version"] == trained_model.version
    assert info["check"]["images"] == 32
    assert info["check"]["max_abs_diff"] < TOLERANCE
    assert info["check"]["tolerance"] == TOLERANCE


def test_onnx_matches_torch_on_real_photos(onnx_folder: Path, real_data_root: Path):
    torch_bundle = load_model_bundle(str(onnx_folder), UNREACHABLE_TRACKING_URI)
    preprocessing = EvalPreprocessing.from_dict(torch_bundle.preprocessing.to_dict())
    batch = _real_batch(real_data_root, preprocessing)
    onnx_model = OnnxModel(onnx_folder / ONNX_FILE, threads=1)

    with torch.inference_mode():
        expected = torch_bundle.model(torch.from_numpy(batch)).numpy()
    together = onnx_model(batch)
    one_by_one = np.concatenate([onnx_model(batch[i : i + 1]) for i in range(len(batch))])

    assert together.shape == (len(CHECK_FILES), 2)
    assert np.abs(together - expected).max() < TOLERANCE
    assert np.abs(one_by_one - expected).max() < TOLERANCE


def test_export_logs_onnx_with_registered_version(
    onnx_folder: Path, onnx_store: str, trained_model: TrainedModel
):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(onnx_store)
    version = client.get_model_version(trained_model.model_name, trained_model.version)
    logged = {Path(item.path).name for item in client.list_artifacts(trained_model.run_id, "onnx")}
    original_artifacts = trained_model.store / "artifacts" / trained_model.run_id / "artifacts"
    shared = MlflowClient(trained_model.tracking_uri).get_model_version(
        trained_model.model_name, trained_model.version
    )

    assert version.tags[ONNX_VERSION_TAG] == f"runs:/{trained_model.run_id}/onnx"
    assert logged == {ONNX_FILE, ONNX_INFO_FILE}
    assert ONNX_VERSION_TAG not in shared.tags
    assert (original_artifacts / "reference").is_dir()
    assert not (original_artifacts / "onnx").exists()


def test_registered_version_served_with_onnx_by_default(
    onnx_folder: Path, onnx_store: str, trained_model: TrainedModel, real_data_root: Path
):
    served = load_served_model(trained_model.alias_uri, onnx_store)
    torch_served = load_served_model(trained_model.alias_uri, onnx_store, runtime="torch")
    batch = _real_batch(real_data_root, served.preprocessing)

    assert served.runtime == "onnx"
    assert served.version == trained_model.version
    assert served.alias == trained_model.alias
    assert served.run_id == trained_model.run_id
    assert "test/acc" in served.test_metrics
    assert torch_served.runtime == "torch (float32)"
    assert np.abs(served.model(batch) - torch_served.model(batch)).max() < TOLERANCE


def test_folder_runtime_follows_setting(onnx_folder: Path, trained_model: TrainedModel):
    auto = load_served_model(str(onnx_folder), UNREACHABLE_TRACKING_URI)
    forced_torch = load_served_model(str(onnx_folder), UNREACHABLE_TRACKING_URI, runtime="torch")

    assert auto.runtime == "onnx"
    assert auto.version == trained_model.version
    assert auto.test_metrics
    assert forced_torch.runtime == "torch (float32)"


def test_runtime_onnx_requires_an_export(trained_model: TrainedModel, tmp_path: Path):
    without_onnx = tmp_path / "model"

    with pytest.raises(ModelLoadError, match="--format onnx") as registry_error:
        load_served_model(trained_model.alias_uri, trained_model.tracking_uri, runtime="onnx")
    without_onnx.mkdir()
    with pytest.raises(ModelLoadError, match="has no model.onnx"):
        load_served_model(str(without_onnx), UNREACHABLE_TRACKING_URI, runtime="onnx")

    assert ONNX_VERSION_TAG in str(registry_error.value)
    assert "runtime=torch" in str(registry_error.value)


class _Shifted(torch.nn.Module):
    """Adds a small offset to another model's probabilities."""

    def __init__(self, inner: torch.nn.Module, offset: float):
        super().__init__()
        self.inner = inner
        self.offset = offset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images) + self.offset


def test_parity_check_rejects_differing_model(onnx_folder: Path, trained_model: TrainedModel):
    torch_bundle = load_model_bundle(str(onnx_folder), UNREACHABLE_TRACKING_URI)
    preprocessing = EvalPreprocessing.from_dict(torch_bundle.preprocessing.to_dict())
    files = sorted((trained_model.data_root / "mask").iterdir())[:4]

    with pytest.raises(OnnxExportError, match="differ by up to 0.001"):
        check_parity(
            _Shifted(torch_bundle.model, 1e-3), onnx_folder / ONNX_FILE, preprocessing, files
        )


def test_export_onnx_without_photos_fails(
    trained_model: TrainedModel, onnx_store: str, tmp_path: Path, caplog
):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "model"

    status = export_main(
        [
            trained_model.alias_uri,
            "--format",
            "onnx",
            "--out",
            str(out),
            "--tracking-uri",
            onnx_store,
            "--images",
            str(empty),
        ]
    )

    assert status == 2
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]
    assert "no image files" in caplog.text


_IMPORT_CHECK = """
import json, sys
from fastapi.testclient import TestClient
from facemask.serving.app import create_app
from facemask.serving.served_model import load_served_model
from facemask.serving.settings import ServeSettings

folder, tracking_uri, photo, log_path = sys.argv[1:5]
served = load_served_model(folder, tracking_uri)
settings = ServeSettings(model_uri=folder, tracking_uri=tracking_uri, prediction_log=log_path)
heavy = ("torch", "lightning", "evidently", "timm", "albumentations", "mlflow")
with TestClient(create_app(settings, served)) as client:
    files = {"file": ("photo.jpg", open(photo, "rb").read(), "image/jpeg")}
    status = client.post("/predict", files=files).status_code
    after_predict = sorted(name for name in heavy if name in sys.modules)
    summary = client.get("/driftsummary").status_code
    after_summary = sorted(name for name in heavy if name in sys.modules)
print(json.dumps({"runtime": served.runtime, "status": status, "summary": summary,
                  "after_predict": after_predict, "after_summary": after_summary}))
"""


def test_onnx_serving_imports_no_training_libraries(
    onnx_folder: Path, real_data_root: Path, tmp_path: Path
):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _IMPORT_CHECK,
            str(onnx_folder),
            UNREACHABLE_TRACKING_URI,
            str(real_data_root / PHOTO),
            str(tmp_path / "predictions.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["runtime"] == "onnx"
    assert report["status"] == 200
    assert report["after_predict"] == []
    assert report["summary"] == 200
    # /driftsummary reads the log with pandas and imports MLflow, but never Evidently.
    assert "evidently" not in report["after_summary"]
    assert "lightning" not in report["after_summary"]
    assert "torch" not in report["after_summary"]


@pytest.fixture(scope="module")
def onnx_server(
    onnx_folder: Path, onnx_store: str, trained_model: TrainedModel, tmp_path_factory
) -> Iterator[Server]:
    """Serve the registered version with runtime=onnx; a 50 ms batching wait groups requests."""
    base = tmp_path_factory.mktemp("onnx-server")
    overrides = ("runtime=onnx", "batching.max_wait_ms=50")
    with run_server(base, trained_model.alias_uri, onnx_store, overrides) as started:
        yield started


def test_onnx_server_answers_over_http(
    onnx_server: Server, onnx_folder: Path, real_data_root: Path
):
    photo = real_data_root / PHOTO
    torch_bundle = load_model_bundle(str(onnx_folder), UNREACHABLE_TRACKING_URI)
    preprocessing = EvalPreprocessing.from_dict(torch_bundle.preprocessing.to_dict())
    array = preprocessing.apply(decode_image(photo, draft_size=preprocessing.draft_size).image)
    with torch.inference_mode():
        expected = torch_bundle.model(torch.from_numpy(array[None])).numpy()[0]

    with httpx.Client(base_url=onnx_server.base_url, timeout=30) as client:
        info = client.get("/info").json()
        response = client.post("/predict", files={"file": ("a.jpg", photo.read_bytes())})
    maps = Path(f"/proc/{onnx_server.process.pid}/maps").read_text()

    assert info["runtime"] == "onnx"
    assert response.status_code == 200
    body = response.json()
    assert abs(body["mask"] - expected[0]) < TOLERANCE
    assert abs(body["no_mask"] - expected[1]) < TOLERANCE
    assert "libtorch" not in maps


def test_onnx_server_batches_concurrent_requests(onnx_server: Server, real_data_root: Path):
    photo = (real_data_root / PHOTO).read_bytes()

    def post(index: int) -> httpx.Response:
        with httpx.Client(base_url=onnx_server.base_url, timeout=60) as client:
            return client.post(
                "/predict",
                files={"file": (f"{index}.jpg", photo, "image/jpeg")},
                headers={"X-Request-ID": f"batched-{index}"},
            )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(CONCURRENT_REQUESTS), timeout=120))
    metrics = httpx.get(f"{onnx_server.base_url}/metrics", timeout=10).text
    logged = [
        json.loads(line)["request_id"]
        for line in onnx_server.prediction_log.read_text().splitlines()
    ]

    assert [r.status_code for r in responses] == [200] * CONCURRENT_REQUESTS
    assert sorted(r for r in logged if r.startswith("batched-")) == sorted(
        f"batched-{i}" for i in range(CONCURRENT_REQUESTS)
    )
    count = _metric(metrics, "facemask_inference_batch_size_count")
    single = _metric(metrics, 'facemask_inference_batch_size_bucket{le="1.0"}')
    assert _metric(metrics, "facemask_inference_batch_size_sum") >= CONCURRENT_REQUESTS
    # Some model calls ran more than one image.
    assert single < count


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is missing from /metrics")
