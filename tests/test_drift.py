"""Drift monitoring: the prediction log reader, the Evidently summary, the routes and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from facemask.data.datamodule import FaceMaskDataModule
from facemask.monitoring.cli import main as drift_main
from facemask.monitoring.drift import (
    ReferenceNotFoundError,
    clear_reference_cache,
    drift_summary,
    load_prediction_log,
    load_reference,
    prediction_summary,
    window_for_hours,
    write_report,
)
from facemask.monitoring.log_reader import log_files
from facemask.monitoring.reference import INPUT_COLUMNS, build_reference, log_reference
from facemask.serving.drift_routes import router
from facemask.settings import project_root

CLASSES = ["mask", "no_mask"]
MODEL_NAME = "facemask-classifier"
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def large_reference(tmp_path_factory, real_data_root: Path) -> pd.DataFrame:
    """Return a reference over the real test split (615 images) with confident predictions.

    The probabilities are drawn around the true class (mean top-class probability about 0.89),
    because training a model that scores the whole data set would take minutes.
    """
    datamodule = FaceMaskDataModule(
        real_data_root, num_workers=0, cache_dir=tmp_path_factory.mktemp("drift-scan-cache")
    )
    datamodule.setup("fit")
    labels = np.asarray(datamodule.datasets["test"].labels)
    top = np.random.default_rng(7).beta(12, 1.5, len(labels))
    probs = np.where(labels[:, None] == np.arange(2)[None, :], top[:, None], 1 - top[:, None])
    return build_reference(datamodule, {"probs": torch.from_numpy(probs)})


def _new_run(tracking_uri: str, name: str) -> str:
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("facemask").experiment_id
    return client.create_run(experiment_id, run_name=name).info.run_id


@pytest.fixture(scope="module")
def reference_run(trained_model, large_reference, tmp_path_factory) -> SimpleNamespace:
    """Log `large_reference` to a new run in the trained model's MLflow store."""
    run_id = _new_run(trained_model.tracking_uri, "drift-reference")
    client = MlflowClient(trained_model.tracking_uri)
    log_reference(client, run_id, large_reference, tmp_path_factory.mktemp("reference-run"))
    return SimpleNamespace(run_id=run_id, tracking_uri=trained_model.tracking_uri)


def to_records(
    frame: pd.DataFrame, start: datetime, version: str = "1", name: str = MODEL_NAME
) -> list[dict]:
    """Turn reference-shaped rows into prediction log records one second apart from `start`."""
    records = []
    for index, row in enumerate(frame.to_dict("records")):
        records.append(
            {
                "timestamp": (start + timedelta(seconds=index)).isoformat(),
                "request_id": f"request-{index}",
                "model_name": name,
                "model_version": version,
                "probabilities": {c: float(row[f"prob_{c}"]) for c in CLASSES},
                "label": row["label"],
                "latency_ms": 20.0,
                "input": {column: row[column] for column in INPUT_COLUMNS},
            }
        )
    return records


def write_log(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in records] + list(extra_lines)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def sample(reference: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    return reference.sample(rows, replace=True, random_state=seed).reset_index(drop=True)


def drifted(reference: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Return darker-than-training photos, all predicted `no_mask` with low confidence."""
    frame = sample(reference, rows, seed=3)
    frame["brightness"] = (frame["brightness"] - 0.3).clip(lower=0.0)
    top = np.random.default_rng(4).uniform(0.5, 0.65, rows)
    frame["prob_no_mask"] = top
    frame["prob_mask"] = 1 - top
    frame["label"] = "no_mask"
    frame["confidence"] = top
    return frame


def current_frame(folder: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Write `frame` as a log and read it back, as the routes and the CLI do."""
    path = write_log(folder / "predictions.jsonl", to_records(frame, NOW - timedelta(hours=1)))
    return load_prediction_log(path).frame


# The reference artifact and its cache.


def test_load_reference_round_trip_and_cache(trained_model, large_reference, tmp_path) -> None:
    run_id = _new_run(trained_model.tracking_uri, "cache-check")
    client = MlflowClient(trained_model.tracking_uri)
    log_reference(client, run_id, large_reference.head(50), tmp_path)

    loaded = load_reference(run_id, trained_model.tracking_uri)
    pd.testing.assert_frame_equal(loaded, large_reference.head(50), check_dtype=False)

    # The cached copy is returned without reading the store again.
    artifact_dir = Path(urlparse(client.get_run(run_id).info.artifact_uri).path)
    (artifact_dir / "reference" / "predictions.csv").unlink()
    assert len(load_reference(run_id, trained_model.tracking_uri)) == 50

    clear_reference_cache()
    with pytest.raises(ReferenceNotFoundError, match=run_id):
        load_reference(run_id, trained_model.tracking_uri)


def test_load_reference_missing_artifact(trained_model) -> None:
    run_id = _new_run(trained_model.tracking_uri, "without-reference")
    with pytest.raises(ReferenceNotFoundError, match="train and register a new model"):
        load_reference(run_id, trained_model.tracking_uri)


def test_load_reference_unknown_run(trained_model) -> None:
    with pytest.raises(ReferenceNotFoundError, match="0" * 32):
        load_reference("0" * 32, trained_model.tracking_uri)


# The drift summary.


def test_drift_summary_reference_sample_no_drift(large_reference, tmp_path) -> None:
    current = current_frame(tmp_path, sample(large_reference, 120, seed=1))
    summary = drift_summary(large_reference, current)

    assert summary["status"] == "ok"
    assert summary["current_rows"] == 120
    assert summary["reference_rows"] == len(large_reference)
    assert summary["drift_detected"] is False
    assert summary["share_of_drifted_columns"] < 0.5
    assert summary["confidence_drift"] is False
    assert summary["mean_confidence"] > 0.8
    expected_columns = {"prob_mask", "prob_no_mask", "confidence", "label", *INPUT_COLUMNS}
    assert set(summary["columns"]) == expected_columns
    assert summary["columns"]["brightness"]["drifted"] is False
    json.dumps(summary, allow_nan=False)


def test_drift_summary_detects_shift(large_reference, tmp_path) -> None:
    current = current_frame(tmp_path, drifted(large_reference, 80))
    summary = drift_summary(large_reference, current)

    assert summary["status"] == "ok"
    assert summary["drift_detected"] is True
    assert summary["share_of_drifted_columns"] >= 0.5
    for column in ("brightness", "label", "confidence", "prob_mask"):
        assert summary["columns"][column]["drifted"] is True, column
        assert summary["columns"][column]["score"] < 0.05, column
    assert summary["columns"]["width"]["drifted"] is False
    assert summary["confidence_drift"] is True
    assert summary["mean_confidence"] < 0.65


def test_drift_summary_single_column_shift(large_reference, tmp_path) -> None:
    frame = sample(large_reference, 100, seed=5)
    before = drift_summary(large_reference, current_frame(tmp_path / "before", frame))
    frame["brightness"] = (frame["brightness"] + 0.25).clip(upper=1.0)
    after = drift_summary(large_reference, current_frame(tmp_path / "after", frame))

    assert before["columns"]["brightness"]["drifted"] is False
    assert after["columns"]["brightness"]["drifted"] is True
    assert after["columns"]["brightness"]["score"] < 1e-6
    others = [name for name in after["columns"] if name != "brightness"]
    assert {name: after["columns"][name] for name in others} == {
        name: before["columns"][name] for name in others
    }
    assert after["number_of_drifted_columns"] == before["number_of_drifted_columns"] + 1
    assert after["drift_detected"] is False
    assert after["confidence_drift"] is False


def test_drift_summary_confidence_threshold(large_reference, tmp_path) -> None:
    current = current_frame(tmp_path, sample(large_reference, 60, seed=6))
    summary = drift_summary(large_reference, current, confidence_threshold=0.99)
    assert summary["confidence_drift"] is True


def test_drift_summary_insufficient_data(large_reference, tmp_path) -> None:
    current = current_frame(tmp_path, sample(large_reference, 29, seed=2))
    summary = drift_summary(large_reference, current)

    assert summary["status"] == "insufficient_data"
    assert "29 predictions" in summary["message"]
    assert summary["drift_detected"] is None
    assert summary["confidence_drift"] is None
    assert drift_summary(large_reference, current, min_rows=29)["status"] == "ok"


def test_drift_summary_empty_reference(large_reference, tmp_path) -> None:
    current = current_frame(tmp_path, sample(large_reference, 40, seed=2))
    summary = drift_summary(large_reference.head(0), current)
    assert summary["status"] == "insufficient_data"
    assert "reference has no rows" in summary["message"]


def test_drift_summary_without_input_properties(large_reference, tmp_path) -> None:
    records = to_records(sample(large_reference, 40, seed=8), NOW - timedelta(hours=1))
    for record in records:
        del record["input"]
    current = load_prediction_log(write_log(tmp_path / "p.jsonl", records)).frame
    summary = drift_summary(large_reference, current)

    assert summary["status"] == "ok"
    assert set(summary["skipped_columns"]) == set(INPUT_COLUMNS)
    assert set(summary["columns"]) == {"prob_mask", "prob_no_mask", "confidence", "label"}


def test_write_report_html_and_json(large_reference, tmp_path) -> None:
    current = current_frame(tmp_path, drifted(large_reference, 40))
    html_path, json_path = write_report(large_reference, current, tmp_path / "report")

    html = html_path.read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "brightness" in html
    report = json.loads(json_path.read_text())
    drift_columns = [m["config"].get("column") for m in report["metrics"]]
    assert "brightness" in drift_columns
    with pytest.raises(ValueError, match="needs rows"):
        write_report(large_reference, current.head(0), tmp_path / "empty")


# Reading the prediction log.


def test_prediction_summary_rates_and_range(large_reference, tmp_path) -> None:
    frame = sample(large_reference, 10, seed=9)
    frame["label"] = ["mask"] * 7 + ["no_mask"] * 3
    start = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)
    path = write_log(tmp_path / "predictions.jsonl", to_records(frame, start))
    summary = prediction_summary(load_prediction_log(path).frame)

    # Lines without face fields, as written before faces were logged: one face per image.
    assert summary == {
        "status": "ok",
        "num_predictions": 10,
        "mask_rate": pytest.approx(0.7),
        "no_mask_rate": pytest.approx(0.3),
        "num_faces": 10,
        "face_counts": {"mask": 7, "no_mask": 3},
        "images_without_face": 0,
        "time_range": {
            "start": "2026-12-04T17:00:00+00:00",
            "end": "2026-12-04T17:00:09+00:00",
        },
    }


def test_prediction_summary_counts_faces(large_reference, tmp_path) -> None:
    records = to_records(sample(large_reference, 4, seed=20), NOW - timedelta(minutes=5))
    # A group photo with one unmasked face, an image without a face found, an image classified
    # whole with the face stage off, and a line from before faces were logged.
    records[0].update(label="no_mask", face_counts={"mask": 3, "no_mask": 1}, face_found=True)
    records[1].update(label="mask", face_counts={"mask": 1, "no_mask": 0}, face_found=False)
    records[2].update(label="no_mask", face_counts={"mask": 0, "no_mask": 1}, face_found=None)
    records[3].update(label="mask")
    bad = {**records[0], "face_counts": {"mask": -1}}
    path = write_log(tmp_path / "predictions.jsonl", records, (json.dumps(bad),))

    prediction_log = load_prediction_log(path)
    summary = prediction_summary(prediction_log.frame)

    assert prediction_log.skipped_lines == 1
    assert list(prediction_log.frame["face_found"]) == [True, False, None, None]
    assert summary["num_predictions"] == 4
    assert summary["mask_rate"] == pytest.approx(0.5)
    assert summary["num_faces"] == 7
    assert summary["face_counts"] == {"mask": 5, "no_mask": 2}
    assert summary["images_without_face"] == 1


def test_prediction_summary_no_data(tmp_path) -> None:
    missing = load_prediction_log(tmp_path / "predictions.jsonl")
    assert missing.files == []
    assert prediction_summary(missing.frame)["status"] == "no_data"
    empty = load_prediction_log(write_log(tmp_path / "predictions.jsonl", []))
    assert prediction_summary(empty.frame)["status"] == "no_data"


def test_log_reader_skips_bad_lines(large_reference, tmp_path) -> None:
    records = to_records(sample(large_reference, 3, seed=10), NOW)
    no_timestamp = {key: value for key, value in records[0].items() if key != "timestamp"}
    bad_lines = (
        "not json at all",
        "[1, 2, 3]",
        json.dumps(no_timestamp),
        json.dumps({**records[0], "timestamp": "yesterday"}),
        json.dumps({**records[0], "probabilities": {"mask": "high"}}),
        json.dumps({**records[0], "probabilities": {}}),
        "",
        json.dumps(records[1])[:40],  # a line cut off by a crash while writing
    )
    path = write_log(tmp_path / "predictions.jsonl", records, bad_lines)
    result = load_prediction_log(path)

    assert len(result.frame) == 3
    assert result.skipped_lines == 7
    assert result.lines == 10


def test_log_reader_time_window(large_reference, tmp_path) -> None:
    start = datetime(2026, 12, 4, 0, 0, tzinfo=UTC)
    records = to_records(sample(large_reference, 6, seed=11), start)
    for hour, record in enumerate(records):
        record["timestamp"] = (start + timedelta(hours=hour)).isoformat()
    # A timestamp without a zone is UTC; one with a zone is converted.
    records[4]["timestamp"] = "2026-12-04T04:00:00"
    records[5]["timestamp"] = "2026-12-04T06:00:00+01:00"
    path = write_log(tmp_path / "predictions.jsonl", records)

    window = load_prediction_log(
        path, since=start + timedelta(hours=1), until=start.replace(hour=4)
    )
    assert [t.hour for t in window.frame["timestamp"]] == [1, 2, 3]
    assert len(load_prediction_log(path, since=start.replace(hour=4)).frame) == 2
    assert len(load_prediction_log(path, until=start.replace(hour=1)).frame) == 1

    since, until = window_for_hours(2, now=start.replace(hour=5, minute=30))
    assert since == start.replace(hour=3, minute=30)
    assert [t.hour for t in load_prediction_log(path, since, until).frame["timestamp"]] == [4, 5]
    with pytest.raises(ValueError, match="positive"):
        window_for_hours(0)


def test_log_reader_rotated_files(large_reference, tmp_path) -> None:
    rows = sample(large_reference, 9, seed=12)
    start = NOW - timedelta(hours=3)
    path = tmp_path / "predictions.jsonl"
    # `.2` is the oldest rotated file, `.1` the next, the unnumbered file the newest.
    write_log(tmp_path / "predictions.jsonl.2", to_records(rows[:3], start))
    write_log(tmp_path / "predictions.jsonl.1", to_records(rows[3:6], start + timedelta(hours=1)))
    write_log(path, to_records(rows[6:], start + timedelta(hours=2)))
    write_log(tmp_path / "predictions.jsonl.bak", to_records(rows[:3], start))

    assert [p.name for p in log_files(path)] == [
        "predictions.jsonl.2",
        "predictions.jsonl.1",
        "predictions.jsonl",
    ]
    result = load_prediction_log(path)
    assert len(result.frame) == 9
    assert result.frame["timestamp"].is_monotonic_increasing

    # A rotated file last written before the window starts is not opened at all.
    old = (NOW - timedelta(days=3)).timestamp()
    os.utime(tmp_path / "predictions.jsonl.2", (old, old))
    recent = load_prediction_log(path, since=NOW - timedelta(days=1))
    assert [p.name for p in recent.files] == ["predictions.jsonl.1", "predictions.jsonl"]
    assert len(recent.frame) == 6


def test_log_reader_model_filter(large_reference, tmp_path) -> None:
    rows = sample(large_reference, 6, seed=13)
    records = to_records(rows[:4], NOW, version="2") + to_records(rows[4:], NOW, version="1")
    path = write_log(tmp_path / "predictions.jsonl", records)
    result = load_prediction_log(path, model_name=MODEL_NAME, model_version="2")

    assert len(result.frame) == 4
    assert result.other_models == 2
    assert set(result.frame["model_version"]) == {"2"}


# The routes, on a minimal app with the state the serving app provides.


def make_client(log_path: Path, tracking_uri: str, run_id: str | None, version: str = "1"):
    app = FastAPI()
    app.state.settings = SimpleNamespace(prediction_log=log_path, tracking_uri=tracking_uri)
    app.state.bundle = (
        None
        if run_id is None
        else SimpleNamespace(run_id=run_id, class_names=CLASSES, name=MODEL_NAME, version=version)
    )
    app.include_router(router)
    return TestClient(app)


def test_drift_route_no_drift_and_drift(reference_run, large_reference, tmp_path) -> None:
    log_path = tmp_path / "predictions.jsonl"
    client = make_client(log_path, reference_run.tracking_uri, reference_run.run_id)
    start = NOW - timedelta(hours=2)
    write_log(log_path, to_records(sample(large_reference, 60, seed=14), start))

    response = client.get("/drift")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["drift_detected"] is False
    assert body["confidence_drift"] is False
    assert body["model"] == {"name": MODEL_NAME, "version": "1", "run_id": reference_run.run_id}
    assert body["window"]["files"] == ["predictions.jsonl"]

    # The same log read as another version has nothing to compare.
    other = make_client(log_path, reference_run.tracking_uri, reference_run.run_id, version="2")
    body = other.get("/drift", params={"min_rows": 10}).json()
    assert body["status"] == "insufficient_data"
    assert body["window"]["other_models"] == 60

    write_log(log_path, to_records(drifted(large_reference, 60), start))
    body = client.get("/drift").json()
    assert body["drift_detected"] is True
    assert body["confidence_drift"] is True
    assert body["columns"]["brightness"]["drifted"] is True


def test_drift_route_window_and_min_rows(reference_run, large_reference, tmp_path) -> None:
    log_path = tmp_path / "predictions.jsonl"
    client = make_client(log_path, reference_run.tracking_uri, reference_run.run_id)
    records = to_records(sample(large_reference, 40, seed=15), NOW - timedelta(hours=30))
    records += to_records(sample(large_reference, 20, seed=16), NOW - timedelta(hours=2))
    write_log(log_path, records)

    body = client.get("/drift").json()
    assert body["status"] == "insufficient_data"
    assert body["current_rows"] == 20
    assert client.get("/drift", params={"hours": 48}).json()["status"] == "ok"
    assert client.get("/drift", params={"min_rows": 20}).json()["status"] == "ok"
    assert client.get("/drift", params={"hours": 0}).status_code == 422


def test_drift_route_no_reference(trained_model, tmp_path) -> None:
    run_id = _new_run(trained_model.tracking_uri, "served-without-reference")
    client = make_client(tmp_path / "predictions.jsonl", trained_model.tracking_uri, run_id)
    response = client.get("/drift")

    assert response.status_code == 404
    assert response.json()["status"] == "no_reference"
    assert run_id in response.json()["message"]


def test_drift_route_without_model(tmp_path) -> None:
    client = make_client(tmp_path / "predictions.jsonl", "sqlite:///unused.db", None)
    response = client.get("/drift")
    assert response.status_code == 503
    assert response.json()["status"] == "no_model"


def test_driftsummary_route(trained_model, large_reference, tmp_path) -> None:
    log_path = tmp_path / "predictions.jsonl"
    client = make_client(log_path, trained_model.tracking_uri, trained_model.run_id)
    no_data = client.get("/driftsummary")
    assert no_data.status_code == 200
    assert no_data.json()["status"] == "no_data"
    assert "message" in no_data.json()

    frame = sample(large_reference, 8, seed=17)
    frame["label"] = ["no_mask"] * 2 + ["mask"] * 6
    old = to_records(frame.head(4), NOW - timedelta(hours=30))
    write_log(log_path, old + to_records(frame.tail(4), NOW - timedelta(hours=1)))

    body = client.get("/driftsummary").json()
    assert body["num_predictions"] == 8
    assert body["mask_rate"] == pytest.approx(0.75)
    assert body["no_mask_rate"] == pytest.approx(0.25)
    assert body["face_counts"] == {"mask": 6, "no_mask": 2}
    recent = client.get("/driftsummary", params={"hours": 24}).json()
    assert recent["num_predictions"] == 4
    assert recent["no_mask_rate"] == 0.0


def test_drift_route_trained_model(trained_model, tmp_path) -> None:
    reference = load_reference(trained_model.run_id, trained_model.tracking_uri)
    log_path = tmp_path / "predictions.jsonl"
    records = to_records(sample(reference, 12, seed=18), NOW - timedelta(minutes=30))
    write_log(log_path, [{**r, "model_version": trained_model.version} for r in records])
    client = make_client(
        log_path, trained_model.tracking_uri, trained_model.run_id, trained_model.version
    )
    body = client.get("/drift", params={"min_rows": 10}).json()

    assert body["status"] == "ok"
    assert body["reference_rows"] == len(reference)
    assert body["current_rows"] == 12


def test_drift_through_serving_app(trained_model, real_data_root: Path, tmp_path) -> None:
    from facemask.serving.app import create_app
    from facemask.serving.model_store import load_model_bundle
    from facemask.serving.settings import ServeSettings

    bundle = load_model_bundle(trained_model.alias_uri, trained_model.tracking_uri)
    settings = ServeSettings(
        model_uri=trained_model.alias_uri,
        tracking_uri=trained_model.tracking_uri,
        prediction_log=tmp_path / "predictions.jsonl",
    )
    photos = sorted((real_data_root / "mask").iterdir())[:3]
    photos += sorted((real_data_root / "no_mask").iterdir())[:3]
    with TestClient(create_app(settings, bundle)) as client:
        assert client.get("/driftsummary").json()["status"] == "no_data"
        for photo in photos:
            files = {"file": (photo.name, photo.read_bytes(), "application/octet-stream")}
            assert client.post("/predict", files=files).status_code == 200
        drift = client.get("/drift", params={"min_rows": 5})
        summary = client.get("/driftsummary").json()

    assert drift.status_code == 200
    body = drift.json()
    assert body["status"] == "ok"
    assert body["current_rows"] == len(photos)
    assert body["model"]["run_id"] == trained_model.run_id
    assert body["window"]["skipped_lines"] == 0
    assert {"brightness", "width", "format"} <= set(body["columns"])
    assert summary["num_predictions"] == len(photos)
    assert summary["mask_rate"] + summary["no_mask_rate"] == pytest.approx(1.0)
    assert summary["num_faces"] >= len(photos)
    assert sum(summary["face_counts"].values()) == summary["num_faces"]


# The command line.


def test_cli_writes_reports(reference_run, large_reference, tmp_path, capsys) -> None:
    log_path = tmp_path / "predictions.jsonl"
    start = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    write_log(log_path, to_records(drifted(large_reference, 50), start))
    out = tmp_path / "out"
    code = drift_main(
        [
            "--run-id",
            reference_run.run_id,
            "--tracking-uri",
            reference_run.tracking_uri,
            "--log",
            str(log_path),
            "--since",
            "2026-12-04T11:00:00Z",
            "--until",
            "2026-12-04T13:00:00+00:00",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out

    assert code == 0
    assert (out / "drift_report.html").stat().st_size > 0
    assert "metrics" in json.loads((out / "drift_report.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drift_detected"] is True
    assert summary["current_rows"] == 50
    # drifted() labels every row no_mask, and each old-format line counts as one face.
    assert summary["face_counts"] == {"mask": 0, "no_mask": 50}
    assert f"HTML report:  {out / 'drift_report.html'}" in printed
    assert '"confidence_drift": true' in printed


def test_cli_model_uri_and_hours(trained_model, tmp_path, capsys) -> None:
    reference = load_reference(trained_model.run_id, trained_model.tracking_uri)
    log_path = tmp_path / "predictions.jsonl"
    records = to_records(sample(reference, 10, seed=19), NOW - timedelta(hours=1))
    write_log(log_path, [{**r, "model_version": trained_model.version} for r in records])
    argv = ["--model-uri", trained_model.alias_uri, "--tracking-uri", trained_model.tracking_uri]
    argv += ["--log", str(log_path), "--hours", "2", "--min-rows", "5", "--out", str(tmp_path)]

    assert drift_main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["run_id"] == trained_model.run_id
    assert summary["model"]["version"] == trained_model.version
    assert summary["status"] == "ok"


def test_cli_expected_failures(trained_model, tmp_path, capsys) -> None:
    log_path = write_log(tmp_path / "predictions.jsonl", [])
    common = ["--tracking-uri", trained_model.tracking_uri, "--log", str(log_path)]

    assert drift_main(["--model-uri", "models:/no-such-model@champion", *common]) == 1
    assert "cannot resolve models:/no-such-model@champion" in capsys.readouterr().err
    assert drift_main(["--model-uri", "runs:/abc/model", *common]) == 1
    assert "unsupported --model-uri" in capsys.readouterr().err
    assert drift_main(["--run-id", trained_model.run_id, *common]) == 1
    error = capsys.readouterr().err
    assert "no predictions of any model" in error
    assert len(error.strip().splitlines()) == 1
    run_id = _new_run(trained_model.tracking_uri, "cli-without-reference")
    assert drift_main(["--run-id", run_id, *common]) == 1
    assert "no drift reference" in capsys.readouterr().err


def test_drift_report_script_help() -> None:
    script = project_root() / "scripts" / "drift_report.py"
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--model-uri" in result.stdout
    assert "--since" in result.stdout
