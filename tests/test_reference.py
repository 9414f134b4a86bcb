"""The drift reference: built from the test split, logged by training as an MLflow artifact."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from facemask.data.datamodule import FaceMaskDataModule
from facemask.data.images import decode_image
from facemask.monitoring.properties import image_properties
from facemask.monitoring.reference import (
    INPUT_COLUMNS,
    REFERENCE_ARTIFACT_PATH,
    build_reference,
    prediction_columns,
)
from tests.helpers import copy_real_subset

CLASSES = ["mask", "no_mask"]


@pytest.fixture(scope="module")
def small_datamodule(tmp_path_factory, real_data_root: Path) -> FaceMaskDataModule:
    data_root = copy_real_subset(real_data_root, tmp_path_factory.mktemp("reference-data"), 20)
    datamodule = FaceMaskDataModule(
        data_root,
        image_size=64,
        num_workers=0,
        splits=(0.4, 0.2, 0.4),
        cache_dir=tmp_path_factory.mktemp("reference-cache"),
    )
    datamodule.setup("fit")
    return datamodule


def _probabilities(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.from_numpy(np.random.default_rng(seed).normal(size=(rows, 2))), 1)


def test_training_logs_reference(trained_model, tmp_path: Path) -> None:
    local = mlflow.artifacts.download_artifacts(
        run_id=trained_model.run_id,
        artifact_path=REFERENCE_ARTIFACT_PATH,
        tracking_uri=trained_model.tracking_uri,
        dst_path=str(tmp_path / "reference"),
    )
    reference = pd.read_csv(local)
    manifest_path = mlflow.artifacts.download_artifacts(
        run_id=trained_model.run_id,
        artifact_path="data/split_manifest.csv",
        tracking_uri=trained_model.tracking_uri,
        dst_path=str(tmp_path / "data"),
    )
    manifest = pd.read_csv(manifest_path)
    test_rows = manifest[manifest["split"] == "test"].reset_index(drop=True)

    assert list(reference.columns) == prediction_columns(CLASSES)
    assert len(reference) == len(test_rows)
    assert len(reference) > 0
    probabilities = reference[["prob_mask", "prob_no_mask"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = [CLASSES[index] for index in probabilities.argmax(axis=1)]
    assert reference["label"].tolist() == predicted
    np.testing.assert_allclose(reference["confidence"], probabilities.max(axis=1))
    # Rows follow the test split's order, and the properties are those of the decoded files.
    for index, relative_path in enumerate(test_rows["path"]):
        decoded = decode_image(trained_model.data_root / relative_path, draft_size=64)
        expected = image_properties(decoded)
        actual = reference.loc[index, list(INPUT_COLUMNS)].to_dict()
        assert actual == pytest.approx(expected), relative_path


def test_build_reference_rows_and_types(small_datamodule: FaceMaskDataModule) -> None:
    paths = small_datamodule.split_paths("test")
    probs = _probabilities(len(paths))
    frame = build_reference(small_datamodule, {"probs": probs})

    assert list(frame.columns) == prediction_columns(CLASSES)
    assert len(frame) == len(paths)
    np.testing.assert_allclose(frame["prob_mask"], probs[:, 0].numpy())
    assert set(frame["format"]) <= {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    assert frame["width"].min() > 0
    assert frame["brightness"].between(0, 1).all()
    assert frame["contrast"].between(0, 0.5).all()


def test_build_reference_fewer_rows(small_datamodule) -> None:
    paths = small_datamodule.split_paths("test")
    frame = build_reference(small_datamodule, {"probs": _probabilities(len(paths) - 2)})
    first = image_properties(decode_image(paths[0], draft_size=64))

    assert len(frame) == len(paths) - 2
    assert frame.loc[0, "brightness"] == pytest.approx(first["brightness"])


def test_build_reference_rejects_extra_rows(small_datamodule) -> None:
    rows = len(small_datamodule.split_paths("test")) + 1
    with pytest.raises(ValueError, match="probability rows"):
        build_reference(small_datamodule, {"probs": _probabilities(rows)})


def test_build_reference_empty_results(small_datamodule) -> None:
    frame = build_reference(small_datamodule, {"probs": torch.empty(0)})
    assert frame.empty
    assert list(frame.columns) == prediction_columns(CLASSES)


def test_build_reference_unreadable_file(tmp_path: Path, real_data_root: Path) -> None:
    data_root = copy_real_subset(real_data_root, tmp_path / "data", 10)
    datamodule = FaceMaskDataModule(
        data_root, image_size=64, num_workers=0, splits=(0.4, 0.2, 0.4), cache_dir=None
    )
    datamodule.setup("fit")
    paths = datamodule.split_paths("test")
    paths[1].write_bytes(b"changed after the scan, no longer an image")

    frame = build_reference(datamodule, {"probs": _probabilities(len(paths))})

    assert len(frame) == len(paths)
    assert frame.loc[1, list(INPUT_COLUMNS)].isna().all()
    assert frame.loc[0, list(INPUT_COLUMNS)].notna().all()
    assert frame.loc[1, "label"] in CLASSES
