"""The drift reference: the model's test-set predictions and input properties.

Training builds it and logs it as an artifact of the run. Drift checks download it again, once
per run and process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from facemask.data.images import InvalidImageError, decode_image
from facemask.monitoring.properties import image_properties

if TYPE_CHECKING:
    from facemask.data.datamodule import FaceMaskDataModule

log = logging.getLogger(__name__)

# Artifact path of the reference inside an MLflow run; serving and the drift report read it.
REFERENCE_ARTIFACT_DIR = "reference"
REFERENCE_FILE_NAME = "predictions.csv"
REFERENCE_ARTIFACT_PATH = f"{REFERENCE_ARTIFACT_DIR}/{REFERENCE_FILE_NAME}"

# Columns shared by the reference and the flattened prediction log, after the `prob_<class>` ones.
NUMERICAL_INPUT_COLUMNS = ("width", "height", "brightness", "contrast")
CATEGORICAL_INPUT_COLUMNS = ("mode", "format")
INPUT_COLUMNS = ("width", "height", "mode", "format", "brightness", "contrast")
PROBABILITY_PREFIX = "prob_"

# A reference of the development set is about 60 KB, so a few runs' worth costs little memory.
_MAX_CACHED_REFERENCES = 8
_reference_cache: dict[tuple[str, str], pd.DataFrame] = {}
_reference_cache_lock = threading.Lock()

# Pillow releases the GIL while it decodes, so threads decode several test images at once.
_MAX_DECODE_THREADS = 8


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """Return the reference columns for a model with these classes, in order."""
    probabilities = [f"{PROBABILITY_PREFIX}{name}" for name in class_names]
    return [*probabilities, "label", "confidence", *INPUT_COLUMNS]


def _input_properties(path: Path, draft_size: int | None) -> dict[str, Any]:
    try:
        return image_properties(decode_image(path, draft_size=draft_size))
    except (InvalidImageError, OSError) as exc:
        # The scan checked every file before training, so this means the file changed since.
        log.warning(
            "Reference: failed to read %s (%s), so its input properties are left empty", path, exc
        )
        return dict.fromkeys(INPUT_COLUMNS)


def build_reference(
    datamodule: FaceMaskDataModule, test_results: Mapping[str, Any]
) -> pd.DataFrame:
    """Build one row per test image: probabilities, label, confidence and input properties.

    Args:
        datamodule: The set-up datamodule whose test split produced `test_results`.
        test_results: The classifier's `test_results`; `probs` contains one row of class
            probabilities per test image, in the order of `datamodule.split_paths("test")`.

    Returns:
        A frame with the columns of `prediction_columns(datamodule.classes)`. When fewer
        probability rows than test images are given (a test run limited to some batches), the
        first images are used, because the test loader does not shuffle.

    Raises:
        ValueError: `probs` has more rows than the test split has images, or the wrong width.
    """
    classes = list(datamodule.classes)
    probs = np.asarray(test_results["probs"], dtype=np.float64).reshape(-1, len(classes))
    paths = datamodule.split_paths("test")
    if len(probs) > len(paths):
        raise ValueError(
            f"test results contain {len(probs)} probability rows but the test split has only "
            f"{len(paths)} images; pass the results of testing this datamodule"
        )
    if len(probs) < len(paths):
        log.info("Reference built from the first %d of %d test images", len(probs), len(paths))
        paths = paths[: len(probs)]

    draft_size = datamodule.preprocessing.draft_size
    workers = max(1, min(_MAX_DECODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        properties = list(pool.map(lambda path: _input_properties(path, draft_size), paths))

    frame = pd.DataFrame(probs, columns=[f"{PROBABILITY_PREFIX}{name}" for name in classes])
    predicted = probs.argmax(axis=1) if len(probs) else np.empty(0, dtype=np.int64)
    frame["label"] = [classes[index] for index in predicted]
    frame["confidence"] = probs.max(axis=1) if len(probs) else np.empty(0)
    inputs = pd.DataFrame(properties, columns=list(INPUT_COLUMNS), index=frame.index)
    return pd.concat([frame, inputs], axis=1)[prediction_columns(classes)]


def log_reference(client: MlflowClient, run_id: str, frame: pd.DataFrame, output_dir: Path) -> Path:
    """Write `frame` to `<output_dir>/reference/predictions.csv` and log it to the run."""
    folder = output_dir / REFERENCE_ARTIFACT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REFERENCE_FILE_NAME
    frame.to_csv(path, index=False)
    client.log_artifact(run_id, str(path), REFERENCE_ARTIFACT_DIR)
    log.info("Logged the drift reference (%d rows) to run %s", len(frame), run_id)
    return path


class ReferenceNotFoundError(LookupError):
    """The run, or its `reference/predictions.csv` artifact, does not exist."""


class ReferenceLoadError(RuntimeError):
    """The reference exists but could not be downloaded or read."""


def load_reference(run_id: str, tracking_uri: str) -> pd.DataFrame:
    """Return the drift reference logged by training run `run_id`, cached in memory per run.

    Raises:
        ReferenceNotFoundError: The run or its reference artifact does not exist.
        ReferenceLoadError: The tracking server or artifact store failed, or the file is invalid.
    """
    key = (tracking_uri, run_id)
    with _reference_cache_lock:
        cached = _reference_cache.get(key)
    if cached is not None:
        return cached.copy()
    frame = _download_reference(run_id, tracking_uri)
    with _reference_cache_lock:
        if len(_reference_cache) >= _MAX_CACHED_REFERENCES:
            _reference_cache.pop(next(iter(_reference_cache)))
        _reference_cache[key] = frame
    return frame.copy()


def clear_reference_cache() -> None:
    """Forget every cached reference, so the next `load_reference` downloads again."""
    with _reference_cache_lock:
        _reference_cache.clear()


def _download_reference(run_id: str, tracking_uri: str) -> pd.DataFrame:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="facemask-reference-") as folder:
        try:
            local_path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=REFERENCE_ARTIFACT_PATH,
                tracking_uri=tracking_uri,
                dst_path=folder,
            )
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ReferenceNotFoundError(
                    f"no drift reference for run {run_id}: {exc.message.rstrip('.')}. Runs "
                    f"trained before drift monitoring existed have no {REFERENCE_ARTIFACT_PATH}, "
                    f"so train and register a new model to get one."
                ) from exc
            raise ReferenceLoadError(
                f"downloading {REFERENCE_ARTIFACT_PATH} of run {run_id} failed: {exc.message}"
            ) from exc
        except OSError as exc:
            raise ReferenceLoadError(
                f"downloading {REFERENCE_ARTIFACT_PATH} of run {run_id} failed: {exc}"
            ) from exc
        try:
            frame = pd.read_csv(local_path, dtype={"label": str, "mode": str, "format": str})
        except (OSError, ValueError) as exc:
            raise ReferenceLoadError(
                f"{REFERENCE_ARTIFACT_PATH} of run {run_id} is not a valid CSV file: {exc}"
            ) from exc
    log.info("Loaded the drift reference of run %s (%d rows)", run_id, len(frame))
    return frame
