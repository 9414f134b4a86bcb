"""Per-face results of the service, checked against the offline face pipeline.

Most tests run a real `serve.py` on 127.0.0.1 that serves a model folder whose MLmodel metadata
has face stage settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from PIL import Image

from facemask.data.images import decode_image
from facemask.faces import FaceStageSettings
from facemask.faces.pipeline import classify_faces
from facemask.serving.app import create_app
from facemask.serving.model_store import ModelLoadError
from facemask.serving.onnx_export import write_onnx_export
from facemask.serving.preprocessing import EvalPreprocessing
from facemask.serving.served_model import ServedModel, load_served_model
from facemask.serving.settings import ServeSettings
from facemask.settings import project_root
from tests.conftest import TrainedModel, encode_image
from tests.test_serve_cli import Server, run_server

# Real photos of the development set, found by running FaceStage over mask/: four people in a
# street (800x600, decoded whole), and three people in a 2000x1156 JPEG that the face stage
# decodes in draft mode at 1000x578.
GROUP_PHOTO = "mask/with_mask338.jpg"
GROUP_FACES = 4
DRAFT_GROUP_PHOTO = "mask/with_mask373.jpg"
DRAFT_GROUP_FACES = 3
# Settings other than the defaults, so a test can tell that they came from the model metadata.
FACE_SETTINGS = FaceStageSettings(margin=0.2, max_faces=16)
CLASSES = ["mask", "no_mask"]
UNREACHABLE_TRACKING_URI = "sqlite:////nonexistent/mlflow.db"


def _write_face_metadata(folder: Path, settings: FaceStageSettings | None) -> None:
    """Set the `face_stage` metadata in the MLmodel file of `folder`."""
    mlmodel = folder / "MLmodel"
    content = yaml.safe_load(mlmodel.read_text())
    content.setdefault("metadata", {})["face_stage"] = (
        None if settings is None else settings.to_dict()
    )
    mlmodel.write_text(yaml.safe_dump(content, sort_keys=False))


@pytest.fixture(scope="module")
def face_model_folder(trained_model: TrainedModel, tmp_path_factory) -> Path:
    """Download the trained model and add face stage settings to its MLmodel metadata."""
    folder = tmp_path_factory.mktemp("face-model")
    mlflow.set_tracking_uri(trained_model.tracking_uri)
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{trained_model.model_name}/{trained_model.version}",
        dst_path=str(folder),
        tracking_uri=trained_model.tracking_uri,
    )
    _write_face_metadata(folder, FACE_SETTINGS)
    return folder


@pytest.fixture(scope="module")
def served(face_model_folder: Path) -> ServedModel:
    return load_served_model(str(face_model_folder), UNREACHABLE_TRACKING_URI, runtime="torch")


@pytest.fixture(scope="module")
def server(face_model_folder: Path, tmp_path_factory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("faces-server")
    with run_server(base, str(face_model_folder), UNREACHABLE_TRACKING_URI) as started:
        yield started


def _post(server: Server, data: bytes, name: str = "photo.jpg", **params: str) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        return client.post(
            "/predict", files={"file": (name, data, "application/octet-stream")}, params=params
        )


def _log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _offline(served: ServedModel, data: bytes):
    """Classify `data` with the offline face pipeline that training and evaluation use."""
    # The served model's own stage: a dropped MediaPipe detector can hang a later GC pass.
    stage = served.face_stage
    assert stage.settings == FACE_SETTINGS
    preprocessing = served.preprocessing
    draft = FACE_SETTINGS.draft_size(preprocessing.image_size, preprocessing.jpeg_draft)
    decoded = decode_image(data, draft_size=draft)
    rgb = np.asarray(decoded.image)
    result = classify_faces(rgb, stage, preprocessing.apply, served.model, served.class_names)
    return decoded, result


def _check_face_entries(body: dict, width: int, height: int) -> None:
    for face in body["faces"]:
        x0, y0, x1, y1 = face["box"]
        assert 0 <= x0 < x1 <= width, face
        assert 0 <= y0 < y1 <= height, face
        assert face["label"] in CLASSES
        assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)
    labels = [face["label"] for face in body["faces"]]
    assert body["counts"] == {name: labels.count(name) for name in CLASSES}
    assert sum(body["counts"].values()) == len(body["faces"])


def test_group_photo_returns_each_face(server: Server, real_data_root: Path):
    data = (real_data_root / GROUP_PHOTO).read_bytes()

    response = _post(server, data)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["face_found"] is True
    assert body["face_search"] is True
    assert len(body["faces"]) == GROUP_FACES
    _check_face_entries(body, 800, 600)
    for face in body["faces"]:
        assert FACE_SETTINGS.min_score <= face["score"] <= 1.0
    # One unmasked face makes the picture unmasked: its no_mask is the highest of any face.
    highest = max(face["probabilities"]["no_mask"] for face in body["faces"])
    assert body["no_mask"] == pytest.approx(highest, abs=1e-6)
    assert body["mask"] + body["no_mask"] == pytest.approx(1.0, abs=1e-5)


def test_served_faces_match_offline_pipeline(
    server: Server, served: ServedModel, real_data_root: Path
):
    # The 2000x1156 JPEG is decoded at 1000x578, so boxes must be scaled back by 2.
    data = (real_data_root / DRAFT_GROUP_PHOTO).read_bytes()

    body = _post(server, data).json()
    decoded, expected = _offline(served, data)

    assert (decoded.width, decoded.height) == (2000, 1156)
    assert decoded.image.size == (1000, 578)
    assert len(body["faces"]) == len(expected.faces) == DRAFT_GROUP_FACES
    _check_face_entries(body, 2000, 1156)
    assert max(face["box"][2] for face in body["faces"]) > 1000
    for face, offline in zip(body["faces"], expected.faces, strict=True):
        scaled = [value * 2 for value in offline.box]
        np.testing.assert_allclose(face["box"], scaled, atol=0.06)
        assert face["score"] == pytest.approx(offline.score, abs=1e-4)
        assert face["label"] == offline.label
        for name in CLASSES:
            assert face["probabilities"][name] == pytest.approx(
                offline.probabilities[name], abs=1e-5
            )
    for name in CLASSES:
        assert body[name] == pytest.approx(expected.probabilities[name], abs=1e-5)
    assert body["label"] == expected.label


def test_boxes_follow_exif_orientation(server: Server, real_data_root: Path):
    # The group photo stored as 600x800 pixels with EXIF orientation 6 (rotate 90 degrees
    # clockwise to display), so it shows upright at 800x600.
    with Image.open(real_data_root / GROUP_PHOTO) as img:
        stored = img.convert("RGB").rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(stored, "JPEG", quality=95, exif=exif)

    body = _post(server, data).json()

    assert body["face_found"] is True
    assert len(body["faces"]) >= 3
    _check_face_entries(body, 800, 600)
    # Stored pixels are 600 wide, so a right edge past 600 is in displayed coordinates.
    assert max(face["box"][2] for face in body["faces"]) > 600


def test_faces_false_returns_whole_image(server: Server, real_data_root: Path):
    data = (real_data_root / GROUP_PHOTO).read_bytes()

    body = _post(server, data, faces="false").json()

    assert body["face_found"] is False
    assert body["face_search"] is False
    [whole] = body["faces"]
    assert whole["box"] == [0.0, 0.0, 800.0, 600.0]
    assert whole["score"] == 0.0
    assert whole["probabilities"] == {name: body[name] for name in CLASSES}
    assert body["counts"][body["label"]] == 1
    assert sum(body["counts"].values()) == 1


def test_flat_image_falls_back_to_whole_image(server: Server):
    data = encode_image(Image.new("RGB", (300, 200), (120, 130, 140)), "PNG")

    body = _post(server, data, name="flat.png").json()

    assert body["face_found"] is False
    assert body["face_search"] is True
    [whole] = body["faces"]
    assert whole["box"] == [0.0, 0.0, 300.0, 200.0]
    assert whole["score"] == 0.0
    assert sum(body["counts"].values()) == 1


def test_invalid_faces_parameter_is_422(server: Server):
    data = encode_image(Image.new("RGB", (32, 32)), "PNG")

    response = _post(server, data, name="a.png", faces="maybe")

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "faces" in error["message"]


def test_batch_results_carry_faces(server: Server, real_data_root: Path):
    group = (real_data_root / GROUP_PHOTO).read_bytes()
    flat = encode_image(Image.new("RGB", (64, 48), (200, 200, 200)), "PNG")
    files = [
        ("files", ("group.jpg", group, "image/jpeg")),
        ("files", ("flat.png", flat, "image/png")),
    ]

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        response = client.post("/predict/batch", files=files)

    assert response.status_code == 200
    group_result, flat_result = response.json()["results"]
    assert len(group_result["faces"]) == GROUP_FACES
    assert group_result["face_found"] is True
    assert flat_result["face_found"] is False
    assert flat_result["faces"][0]["box"] == [0.0, 0.0, 64.0, 48.0]


def test_info_reports_face_stage(server: Server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        face_stage = client.get("/info").json()["face_stage"]

    assert face_stage == {
        "enabled": True,
        "detector": "blazeface_short_range",
        "settings": FACE_SETTINGS.to_dict(),
        "settings_source": "model metadata",
    }


def test_log_and_driftsummary_count_faces(server: Server, real_data_root: Path):
    group = (real_data_root / GROUP_PHOTO).read_bytes()
    flat = encode_image(Image.new("RGB", (100, 100), (90, 90, 90)), "PNG")
    responses = [
        _post(server, group),
        _post(server, group, faces="false"),
        _post(server, flat, name="flat.png"),
    ]
    bodies = {response.json()["request_id"]: response.json() for response in responses}

    records = _log_records(server.prediction_log)
    by_id = {record["request_id"]: record for record in records}
    for request_id, body in bodies.items():
        record = by_id[request_id]
        assert record["face_counts"] == body["counts"]
    group_id, whole_id, flat_id = list(bodies)
    assert by_id[group_id]["face_found"] is True
    assert sum(by_id[group_id]["face_counts"].values()) == GROUP_FACES
    assert by_id[whole_id]["face_found"] is None
    assert by_id[flat_id]["face_found"] is False

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        summary = client.get("/driftsummary").json()

    # Expected figures from the raw log lines, whichever tests ran before.
    expected_counts = {name: sum(r["face_counts"][name] for r in records) for name in CLASSES}
    assert summary["num_predictions"] == len(records)
    assert summary["face_counts"] == expected_counts
    assert summary["num_faces"] == sum(expected_counts.values())
    assert summary["num_faces"] >= summary["num_predictions"] + GROUP_FACES - 1
    assert summary["images_without_face"] == sum(r["face_found"] is False for r in records)
    assert summary["images_without_face"] >= 1


# In-process apps: micro-batching of face crops, the configuration switch, loading.


class _CountingModel:
    """Wraps a runtime and records the batch size of every call."""

    name = "counting"

    def __init__(self, inner):
        self.inner = inner
        self.batch_sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(batch))
        return self.inner(batch)


def _client(served: ServedModel, tmp_path: Path, **overrides: object) -> TestClient:
    settings = ServeSettings(
        model_uri="face-model",
        tracking_uri=UNREACHABLE_TRACKING_URI,
        prediction_log=tmp_path / "predictions.jsonl",
        **overrides,
    )
    return TestClient(create_app(settings, served))


@pytest.mark.parametrize(("max_batch_size", "expected"), [(16, [GROUP_FACES]), (3, [3, 1])])
def test_face_crops_share_model_calls(
    served: ServedModel, real_data_root: Path, tmp_path: Path, max_batch_size: int, expected
):
    counting = _CountingModel(served.model)
    data = (real_data_root / GROUP_PHOTO).read_bytes()

    with _client(
        dataclasses.replace(served, model=counting), tmp_path, max_batch_size=max_batch_size
    ) as client:
        counting.batch_sizes.clear()
        response = client.post("/predict", files={"file": ("group.jpg", data, "image/jpeg")})

    assert response.status_code == 200
    assert len(response.json()["faces"]) == GROUP_FACES
    assert counting.batch_sizes == expected


def test_config_faces_false_classifies_whole_image(
    served: ServedModel, real_data_root: Path, tmp_path: Path
):
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=["faces=false"])
        default = compose(config_name="serve")
    settings = ServeSettings.from_config(cfg)
    data = (real_data_root / GROUP_PHOTO).read_bytes()

    assert ServeSettings.from_config(default).faces is True
    assert settings.faces is False
    with _client(served, tmp_path, faces=settings.faces) as client:
        body = client.post("/predict", files={"file": ("g.jpg", data, "image/jpeg")}).json()
        # A request cannot turn on a stage that the configuration turned off.
        forced = client.post(
            "/predict", files={"file": ("g.jpg", data, "image/jpeg")}, params={"faces": "true"}
        ).json()
        info = client.get("/info").json()

    for result in (body, forced):
        assert result["face_search"] is False
        assert len(result["faces"]) == 1
    assert info["face_stage"]["enabled"] is False
    with pytest.raises(ValueError, match="faces='maybe' is invalid"):
        ServeSettings(model_uri="m", tracking_uri="t", faces="maybe")


def test_model_without_face_metadata_uses_defaults(face_model_folder: Path, tmp_path: Path, caplog):
    folder = tmp_path / "whole-image-model"
    shutil.copytree(face_model_folder, folder)
    _write_face_metadata(folder, None)

    with caplog.at_level("INFO", logger="facemask.serving.faces"):
        model = load_served_model(str(folder), UNREACHABLE_TRACKING_URI, runtime="torch")

    assert model.face_settings is None
    assert model.face_stage.settings == FaceStageSettings()
    messages = [record.getMessage() for record in caplog.records]
    notes = [message for message in messages if "no face_stage metadata" in message]
    assert len(notes) == 1
    with _client(model, tmp_path) as client:
        face_stage = client.get("/info").json()["face_stage"]
    assert face_stage["settings_source"] == "defaults"
    assert face_stage["settings"] == FaceStageSettings().to_dict()


def test_invalid_face_metadata_is_load_error(face_model_folder: Path, tmp_path: Path):
    folder = tmp_path / "bad-metadata"
    shutil.copytree(face_model_folder, folder)
    mlmodel = folder / "MLmodel"
    content = yaml.safe_load(mlmodel.read_text())
    content["metadata"]["face_stage"] = {"margin": 0.2, "zoom": 3}
    mlmodel.write_text(yaml.safe_dump(content))

    with pytest.raises(ModelLoadError, match=r"invalid face_stage metadata.*zoom"):
        load_served_model(str(folder), UNREACHABLE_TRACKING_URI, runtime="torch")


def test_missing_detector_model(face_model_folder: Path, tmp_path: Path, monkeypatch):
    from facemask.faces import detector

    # Settings no other test uses, because the service shares one stage per settings.
    folder = tmp_path / "model"
    shutil.copytree(face_model_folder, folder)
    _write_face_metadata(folder, dataclasses.replace(FACE_SETTINGS, max_faces=7))
    monkeypatch.setattr(detector, "MODELS_DIR", tmp_path / "no-models")

    with pytest.raises(ModelLoadError, match="fetch-face-model") as raised:
        load_served_model(str(folder), UNREACHABLE_TRACKING_URI, runtime="torch")
    without_stage = load_served_model(
        str(folder), UNREACHABLE_TRACKING_URI, runtime="torch", faces=False
    )

    assert "faces=false" in str(raised.value)
    assert without_stage.face_stage is None
    settings = ServeSettings(model_uri="m", tracking_uri="t", prediction_log=tmp_path / "p.jsonl")
    with pytest.raises(ModelLoadError, match="face detector"):
        create_app(settings, without_stage)
    create_app(dataclasses.replace(settings, faces=False), without_stage)


# Started like serve.py, with the detector's model folder pointing at an empty folder.
_SERVE_WITHOUT_DETECTOR = """
import sys
from pathlib import Path

from facemask.faces import detector

detector.MODELS_DIR = Path(sys.argv.pop(1))
from facemask.serve import main

main()
"""


def test_serve_exits_when_detector_is_missing(face_model_folder: Path, tmp_path: Path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SERVE_WITHOUT_DETECTOR,
            str(empty),
            f"model.uri={face_model_folder}",
            f"mlflow.tracking_uri={UNREACHABLE_TRACKING_URI}",
            f"prediction_log.path={tmp_path / 'logs' / 'predictions.jsonl'}",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    error_lines = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(error_lines) == 1, output
    assert "Cannot load the face detector 'blazeface_short_range'" in error_lines[0]
    assert "facemask fetch-face-model" in error_lines[0]
    assert "faces=false" in error_lines[0]
    assert "Traceback" not in output


def test_onnx_export_copies_face_metadata(real_data_root: Path, tmp_path: Path):
    # A small real module with the served contract: NCHW images in, two class probabilities out.
    module = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(3, 2),
        torch.nn.Softmax(dim=1),
    ).eval()
    preprocessing = EvalPreprocessing.from_dict({"image_size": 32})
    photos = [real_data_root / GROUP_PHOTO, real_data_root / DRAFT_GROUP_PHOTO]
    with_metadata = tmp_path / "with-metadata"
    without_metadata = tmp_path / "without-metadata"
    for folder, settings in ((with_metadata, FACE_SETTINGS), (without_metadata, None)):
        folder.mkdir()
        metadata = {"face_stage": None if settings is None else settings.to_dict()}
        (folder / "MLmodel").write_text(yaml.safe_dump({"metadata": metadata}))

    info = write_onnx_export(module, CLASSES, preprocessing, photos, with_metadata, source={})
    plain = write_onnx_export(module, CLASSES, preprocessing, photos, without_metadata, source={})
    onnx_served = load_served_model(str(with_metadata), UNREACHABLE_TRACKING_URI, runtime="onnx")

    assert info["face_stage"] == FACE_SETTINGS.to_dict()
    assert json.loads((with_metadata / "facemask_onnx.json").read_text())["face_stage"] == (
        FACE_SETTINGS.to_dict()
    )
    assert "face_stage" not in plain
    assert onnx_served.runtime == "onnx"
    assert onnx_served.face_settings == FACE_SETTINGS
    assert onnx_served.face_stage.settings == FACE_SETTINGS
    with TestClient(
        create_app(
            ServeSettings(model_uri="onnx", tracking_uri="t", prediction_log=tmp_path / "p.jsonl"),
            onnx_served,
        )
    ) as client:
        data = (real_data_root / GROUP_PHOTO).read_bytes()
        body = client.post("/predict", files={"file": ("g.jpg", data, "image/jpeg")}).json()
    assert len(body["faces"]) == GROUP_FACES
