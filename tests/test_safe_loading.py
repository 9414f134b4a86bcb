"""Loading a model never runs code from the model files, and responses leak no request data.

Each planted payload writes a marker file when it runs; the tests assert that loading fails
with `ModelLoadError` and that the marker does not exist. The payloads sit in a pickle-format
PyTorch model (`data/model.pth`), in a module shipped with the model (`code_paths`, named as its
pickle module), in a local folder and in an MLflow run artifact.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from fastapi.testclient import TestClient

from facemask.serving.app import create_app
from facemask.serving.model_store import ModelLoadError, load_model_bundle
from facemask.serving.served_model import ServedModel, load_served_model
from facemask.serving.settings import ServeSettings
from tests.conftest import TrainedModel, encode_image, noise_image

METADATA = {
    "class_names": ["mask", "no_mask"],
    "preprocessing": {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
}
SECRET = "s3cr3t-token-0123456789"


class _Payload:
    """Unpickles to `open(marker, "w")`: the file exists afterwards only if it was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _save_pickle_model(folder: Path, marker: Path, code_module: str | None = None) -> Path:
    """Save a pickle-format MLflow PyTorch model at `folder`, its weights replaced by a payload.

    With `code_module`, the model ships a module of that name (MLflow `code_paths`) that writes
    the marker when it is imported, and names it as the pickle module to load with.
    """
    code_paths = None
    if code_module is not None:
        module_file = folder.parent / f"{code_module}.py"
        module_file.write_text(f"open({str(marker)!r}, 'w').close()\nUnpickler = None\n")
        code_paths = [str(module_file)]
    mlflow.pytorch.save_model(
        torch.nn.Linear(3, 2),
        str(folder),
        serialization_format="pickle",
        metadata=METADATA,
        code_paths=code_paths,
        # Fixed requirements skip MLflow's inference, which imports the environment (seconds).
        pip_requirements=["torch"],
    )
    torch.save(_Payload(marker), folder / "data" / "model.pth")
    if code_module is not None:
        (folder / "data" / "pickle_module_info.txt").write_text(code_module)
    return folder


@pytest.fixture
def clean_imports() -> Iterator[None]:
    """Restore `sys.path` and forget modules that a test's model may have put there."""
    path = list(sys.path)
    modules = set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith("planted_"):
            del sys.modules[name]
    importlib.invalidate_caches()


LOADERS: dict[str, Callable[[str, str], object]] = {
    "load_model_bundle": load_model_bundle,
    "load_served_model_torch": lambda uri, tracking: load_served_model(
        uri, tracking, runtime="torch"
    ),
    "load_served_model_auto": lambda uri, tracking: load_served_model(uri, tracking),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("with_code", [False, True], ids=["pickle", "pickle_module_in_code"])
def test_folder_pickle_payload_not_run(tmp_path: Path, loader: str, with_code: bool, clean_imports):
    marker = tmp_path / "payload-ran"
    module = f"planted_{loader}" if with_code else None
    folder = _save_pickle_model(tmp_path / "model", marker, module)

    with pytest.raises(ModelLoadError):
        LOADERS[loader](str(folder), "sqlite:///unused.db")

    assert not marker.exists()


@pytest.mark.parametrize("with_code", [False, True], ids=["pickle", "pickle_module_in_code"])
def test_run_artifact_pickle_payload_not_run(tmp_path: Path, with_code: bool, clean_imports):
    marker = tmp_path / "payload-ran"
    module = "planted_run_artifact" if with_code else None
    folder = _save_pickle_model(tmp_path / "model", marker, module)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("planted", artifact_location=str(tmp_path / "art"))
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)

    with pytest.raises(ModelLoadError):
        load_model_bundle(f"runs:/{run.info.run_id}/model", tracking_uri)

    assert not marker.exists()


@pytest.fixture(scope="module")
def served(trained_model: TrainedModel) -> ServedModel:
    return load_served_model(trained_model.alias_uri, trained_model.tracking_uri, runtime="torch")


@pytest.fixture
def client(
    served: ServedModel, trained_model: TrainedModel, tmp_path: Path
) -> Iterator[TestClient]:
    settings = ServeSettings(
        model_uri=trained_model.alias_uri,
        tracking_uri=trained_model.tracking_uri,
        prediction_log=tmp_path / "predictions.jsonl",
    )
    with TestClient(create_app(settings, served), raise_server_exceptions=False) as started:
        yield started


def _response_text(response) -> str:
    return response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())


def test_upload_name_never_used_as_path(client: TestClient, tmp_path: Path):
    photo = encode_image(noise_image((24, 24), 21), "PNG")
    target = tmp_path / "written-by-upload.png"
    names = [str(target), f"../../../../../..{target}", f"..\\..\\{target.name}", "x/../../y"]
    for name in names:
        good = client.post("/predict", files={"file": (name, photo, "image/png")})
        bad = client.post("/predict", files={"file": (name, b"not an image", "image/png")})

        assert good.status_code == 200
        assert bad.status_code == 415
        assert name not in _response_text(good)
        assert name not in _response_text(bad)
    assert not target.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "predictions.jsonl",
        "predictions.jsonl.lock",
    ]


def test_batch_echoes_only_base_name(client: TestClient, tmp_path: Path):
    photo = encode_image(noise_image((24, 24), 22), "PNG")
    files = [
        ("files", (f"{tmp_path}/secret/face.png", photo, "image/png")),
        ("files", ("C:\\Users\\someone\\face2.png", b"not an image", "image/png")),
    ]
    response = client.post("/predict/batch", files=files)

    assert response.status_code == 200
    assert [result["filename"] for result in response.json()["results"]] == [
        "face.png",
        "face2.png",
    ]
    assert str(tmp_path) not in response.text
    assert "someone" not in response.text


def test_secrets_not_echoed(client: TestClient):
    photo = encode_image(noise_image((24, 24), 23), "PNG")
    headers = {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}"}
    responses = [
        client.post(f"/predict?token={SECRET}", files={"file": ("a.png", photo)}, headers=headers),
        client.post("/predict", files={"file": (SECRET, b"junk")}, headers=headers),
        client.post("/predict", data={SECRET: SECRET}, headers=headers),
        client.get(f"/drift?hours={SECRET}", headers=headers),
        client.get(f"/driftsummary?hours={SECRET}", headers=headers),
        client.get(f"/{SECRET}", headers=headers),
        client.post("/predict", headers={"X-Request-ID": f"{SECRET} with spaces"}),
    ]

    assert [response.status_code for response in responses] == [200, 415, 422, 422, 422, 404, 422]
    for response in responses:
        assert SECRET not in _response_text(response), response.request.url


def test_internal_error_hides_details(client: TestClient, monkeypatch, tmp_path: Path):
    secret_path = tmp_path / SECRET

    def fail(images):
        raise RuntimeError(f"cannot open {secret_path}")

    monkeypatch.setattr(client.app.state.batcher, "run_batch", fail)
    response = client.post(
        "/predict", files={"file": ("a.png", encode_image(noise_image((24, 24), 24), "PNG"))}
    )

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert SECRET not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
