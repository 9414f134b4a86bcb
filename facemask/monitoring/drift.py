"""Compare logged predictions with the training reference of the served run, using Evidently.

Evidently takes several seconds to import, so it is imported inside the functions that use it.
Loading the reference (`facemask.monitoring.reference`) and reading the prediction log
(`facemask.monitoring.log_reader`) are re-exported here.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from facemask.monitoring.log_reader import (
    FACE_COUNT_PREFIX,
    PredictionLog,
    load_prediction_log,
    window_for_hours,
)
from facemask.monitoring.reference import (
    CATEGORICAL_INPUT_COLUMNS,
    NUMERICAL_INPUT_COLUMNS,
    PROBABILITY_PREFIX,
    ReferenceLoadError,
    ReferenceNotFoundError,
    clear_reference_cache,
    load_reference,
)

__all__ = [
    "ReferenceLoadError",
    "ReferenceNotFoundError",
    "clear_reference_cache",
    "describe_log",
    "drift_summary",
    "face_summary",
    "load_prediction_log",
    "load_reference",
    "prediction_summary",
    "window_for_hours",
    "write_report",
]

log = logging.getLogger(__name__)

DEFAULT_MIN_ROWS = 30
# Mean top-class probability below which the model is taken to be unsure of the current inputs.
DEFAULT_CONFIDENCE_THRESHOLD = 0.8
# Evidently's default: the data set drifts when at least this share of its columns drift.
DEFAULT_DRIFT_SHARE = 0.5

REPORT_HTML_NAME = "drift_report.html"
REPORT_JSON_NAME = "drift_report.json"


class _NoComparableColumnsError(ValueError):
    """No reference column has values in both frames, so there is nothing to test."""


def _drift_columns(reference: pd.DataFrame) -> tuple[list[str], list[str]]:
    probabilities = [name for name in reference.columns if name.startswith(PROBABILITY_PREFIX)]
    numerical = [*probabilities, "confidence", *NUMERICAL_INPUT_COLUMNS]
    categorical = ["label", *CATEGORICAL_INPUT_COLUMNS]
    return (
        [name for name in numerical if name in reference.columns],
        [name for name in categorical if name in reference.columns],
    )


def _as_category(value: Any) -> str | None:
    return None if pd.isna(value) else str(value)


def _prepare(
    reference: pd.DataFrame, current: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str], list[str]]:
    """Align both frames on the reference columns and drop columns empty in either frame."""
    numerical, categorical = _drift_columns(reference)
    frames = []
    for frame in (reference, current):
        aligned = frame.reindex(columns=numerical + categorical)
        for name in numerical:
            aligned[name] = pd.to_numeric(aligned[name], errors="coerce").astype("float64")
        for name in categorical:
            aligned[name] = aligned[name].map(_as_category).astype(object)
        frames.append(aligned.reset_index(drop=True))
    ref, cur = frames
    empty = [name for name in ref.columns if ref[name].isna().all() or cur[name].isna().all()]
    if empty:
        log.info("Drift check skips columns without values in both frames: %s", empty)
    kept_numerical = [name for name in numerical if name not in empty]
    kept_categorical = [name for name in categorical if name not in empty]
    columns = kept_numerical + kept_categorical
    return ref[columns], cur[columns], kept_numerical, kept_categorical, empty


def _run_report(
    reference: pd.DataFrame, current: pd.DataFrame, drift_share: float
) -> tuple[Any, list[str]]:
    """Run Evidently's data drift preset; return the snapshot and the skipped columns."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref, cur, numerical, categorical, skipped = _prepare(reference, current)
    if not numerical and not categorical:
        raise _NoComparableColumnsError(
            "no column has values in both the reference and the current predictions"
        )
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    report = Report(
        [DataDriftPreset(columns=numerical + categorical, drift_share=drift_share)],
        include_tests=True,
    )
    snapshot = report.run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
    )
    return snapshot, skipped


def _column_results(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # Evidently 0.7 marks each per-column drift test FAIL when that column drifted.
    statuses = {}
    for test in snapshot.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith(":ValueDrift"):
            statuses[params["column"]] = test.get("status")
    columns = {}
    for metric in snapshot.get("metrics", []):
        config = metric.get("config", {})
        if not config.get("type", "").endswith(":ValueDrift"):
            continue
        score = float(metric["value"])
        columns[config["column"]] = {
            # JSON has no NaN, and a test on a constant column can return one.
            "score": score if math.isfinite(score) else None,
            "method": config.get("method"),
            "threshold": config.get("threshold"),
            "drifted": statuses.get(config["column"]) == "FAIL",
        }
    return columns


def _mean_confidence(frame: pd.DataFrame) -> float | None:
    if "confidence" not in frame.columns:
        return None
    values = pd.to_numeric(frame["confidence"], errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def drift_summary(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    drift_share: float = DEFAULT_DRIFT_SHARE,
) -> dict[str, Any]:
    """Test every reference column for drift with Evidently and check the mean confidence.

    Args:
        reference: The reference of the served run (see `load_reference`).
        current: Flattened logged predictions (see `load_prediction_log`).
        min_rows: Minimum number of current rows for a drift verdict. Fewer rows give the
            status `insufficient_data`.
        confidence_threshold: A mean top-class probability below this sets `confidence_drift`.
        drift_share: Share of drifted columns at which `drift_detected` becomes true.

    Returns:
        A JSON-serialisable dict with `status` (`ok` or `insufficient_data`), `drift_detected`,
        `share_of_drifted_columns`, `columns` (per column: `score`, `method`, `threshold`,
        `drifted`), `mean_confidence` and `confidence_drift`. The verdicts are None unless the
        status is `ok`.
    """
    summary: dict[str, Any] = {
        "status": "ok",
        "reference_rows": len(reference),
        "current_rows": len(current),
        "min_rows": min_rows,
        "drift_detected": None,
        "number_of_drifted_columns": None,
        "share_of_drifted_columns": None,
        "drift_share": drift_share,
        "columns": {},
        "skipped_columns": [],
        "mean_confidence": _mean_confidence(current),
        "reference_mean_confidence": _mean_confidence(reference),
        "confidence_threshold": confidence_threshold,
        "confidence_drift": None,
    }
    if reference.empty:
        summary["status"] = "insufficient_data"
        summary["message"] = "the reference has no rows, so there is nothing to compare with"
        return summary
    if len(current) < min_rows:
        summary["status"] = "insufficient_data"
        summary["message"] = (
            f"{len(current)} predictions in the window, fewer than the {min_rows} needed; "
            f"widen the time window or lower min_rows"
        )
        return summary

    try:
        snapshot, skipped = _run_report(reference, current, drift_share)
    except _NoComparableColumnsError as exc:
        summary["status"] = "insufficient_data"
        summary["message"] = str(exc)
        return summary
    columns = _column_results(snapshot.dict())
    drifted = sum(1 for result in columns.values() if result["drifted"])
    share = drifted / len(columns) if columns else 0.0
    summary["columns"] = columns
    summary["skipped_columns"] = skipped
    summary["number_of_drifted_columns"] = drifted
    summary["share_of_drifted_columns"] = share
    summary["drift_detected"] = bool(columns) and share >= drift_share
    mean_confidence = summary["mean_confidence"]
    summary["confidence_drift"] = mean_confidence is not None and (
        mean_confidence < confidence_threshold
    )
    return summary


def write_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: str | Path,
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
) -> tuple[Path, Path]:
    """Write the Evidently drift report as HTML and JSON into `out_dir`; return both paths.

    Raises:
        ValueError: The reference or the current data has no rows.
    """
    if reference.empty or current.empty:
        raise ValueError(
            f"a drift report needs rows in both frames; the reference has {len(reference)} "
            f"and the current data {len(current)}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot, _ = _run_report(reference, current, drift_share)
    html_path = out_dir / REPORT_HTML_NAME
    json_path = out_dir / REPORT_JSON_NAME
    snapshot.save_html(str(html_path))
    snapshot.save_json(str(json_path))
    return html_path, json_path


def _classes(current: pd.DataFrame) -> list[str]:
    """Return the classes of the probability columns, then any other label or face class."""
    classes = [
        name.removeprefix(PROBABILITY_PREFIX)
        for name in current.columns
        if name.startswith(PROBABILITY_PREFIX)
    ]
    others = set(current["label"].astype(str)) if "label" in current.columns else set()
    others |= {
        name.removeprefix(FACE_COUNT_PREFIX)
        for name in current.columns
        if name.startswith(FACE_COUNT_PREFIX)
    }
    return classes + sorted(others - set(classes))


def face_summary(current: pd.DataFrame) -> dict[str, Any]:
    """Count the faces per predicted class, and the images in which no face was found.

    An image without a face found counts as one face of its label, so `num_faces` is at least
    the number of images. `images_without_face` leaves out images that the face stage did not
    search, whose `face_found` is unknown.
    """
    face_counts = {}
    for name in _classes(current):
        column = f"{FACE_COUNT_PREFIX}{name}"
        if column in current.columns:
            counts = pd.to_numeric(current[column], errors="coerce").fillna(0)
            face_counts[name] = int(counts.sum())
        else:
            face_counts[name] = 0
    without_face = 0
    if "face_found" in current.columns:
        # None (not searched) is neither True nor False, so it is left out.
        without_face = int(current["face_found"].isin([False]).sum())
    return {
        "num_faces": sum(face_counts.values()),
        "face_counts": face_counts,
        "images_without_face": without_face,
    }


def prediction_summary(current: pd.DataFrame) -> dict[str, Any]:
    """Count the predictions, the share of each predicted class and the faces per class.

    The time range of the predictions is included.
    """
    if current.empty:
        return {"status": "no_data", "message": "no predictions have been logged in this window"}
    classes = _classes(current)
    labels = current["label"].astype(str)
    counts = labels.value_counts()
    summary: dict[str, Any] = {"status": "ok", "num_predictions": len(current)}
    for name in classes:
        summary[f"{name}_rate"] = float(counts.get(name, 0)) / len(current)
    summary.update(face_summary(current))
    timestamps = pd.to_datetime(current["timestamp"], utc=True)
    summary["time_range"] = {
        "start": timestamps.min().isoformat(),
        "end": timestamps.max().isoformat(),
    }
    return summary


def describe_log(
    prediction_log: PredictionLog, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    """Return the window and the read statistics of a loaded log, for JSON output."""
    return {
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "files": [path.name for path in prediction_log.files],
        "lines": prediction_log.lines,
        "skipped_lines": prediction_log.skipped_lines,
        "other_models": prediction_log.other_models,
        "unreadable_files": [path.name for path in prediction_log.unreadable_files],
    }
