"""Read the JSON-lines prediction log, rotated files included, into a flat frame.

Each line of the log is one prediction, for example::

    {"timestamp": "2026-12-04T17:00:00.123456+00:00", "request_id": "...",
     "model_name": "facemask-classifier", "model_version": "3",
     "probabilities": {"mask": 0.9, "no_mask": 0.1}, "label": "mask",
     "face_counts": {"mask": 2, "no_mask": 0}, "face_found": true, "latency_ms": 21.5,
     "input": {"width": 640, "height": 480, "mode": "RGB", "format": "JPEG",
               "brightness": 0.45, "contrast": 0.21}}

`face_found` is null when the face stage did not run. Lines written before the service logged
faces have neither field; they count as one face of their label, with `face_found` unknown.

Rotated files are `<name>.1` (newest) to `<name>.N` (oldest), as `RotatingFileHandler` names them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from facemask.monitoring.reference import INPUT_COLUMNS, PROBABILITY_PREFIX

log = logging.getLogger(__name__)

# Columns of the flattened log besides `prob_<class>`, `faces_<class>` and the reference columns.
META_COLUMNS = ("timestamp", "model_name", "model_version")
# Prefix of the columns that count the faces of each predicted class in one image.
FACE_COUNT_PREFIX = "faces_"


class InvalidRecordError(ValueError):
    """A log line that is not a prediction record."""


@dataclass
class PredictionLog:
    """Predictions read from a log within a time window.

    Attributes:
        frame: One row per prediction, sorted by `timestamp` (timezone-aware, UTC).
        files: The log files that were read, oldest first.
        lines: Non-blank lines read from those files, inside the window or not.
        skipped_lines: Lines that are not valid prediction records.
        other_models: Valid records in the window that a model filter excluded.
        unreadable_files: Log files that could not be opened or read, such as one rotated
            away between listing and opening.
    """

    frame: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    lines: int = 0
    skipped_lines: int = 0
    other_models: int = 0
    unreadable_files: list[Path] = field(default_factory=list)


def log_files(path: Path) -> list[Path]:
    """Return `path` and its rotated files `path.1` ... `path.N` that exist, oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
    rotated: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.fullmatch(candidate.name)
            if match and candidate.is_file():
                rotated.append((int(match.group(1)), candidate))
    files = [candidate for _, candidate in sorted(rotated, reverse=True)]
    if path.is_file():
        files.append(path)
    return files


def parse_timestamp(value: str | datetime) -> datetime:
    """Parse an ISO 8601 timestamp; one without a timezone is taken as UTC."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def window_for_hours(hours: float, now: datetime | None = None) -> tuple[datetime, datetime]:
    """Return the window `(now - hours, now)` in UTC."""
    if not hours > 0:
        raise ValueError(f"hours must be positive, got {hours}")
    end = parse_timestamp(now) if now is not None else datetime.now(UTC)
    return end - timedelta(hours=hours), end


def flatten_record(record: Any) -> dict[str, Any]:
    """Flatten one parsed log line into the reference columns plus `timestamp` and model ids.

    Raises:
        InvalidRecordError: The record has no valid timestamp or probabilities.
    """
    if not isinstance(record, dict):
        raise InvalidRecordError(f"expected a JSON object, got {type(record).__name__}")
    try:
        timestamp = parse_timestamp(record["timestamp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRecordError(f"missing or invalid timestamp: {exc}") from exc
    probabilities = record.get("probabilities")
    if not isinstance(probabilities, dict) or not probabilities:
        raise InvalidRecordError("missing or empty probabilities")
    try:
        values = {str(name): float(value) for name, value in probabilities.items()}
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRecordError(f"non-numeric probability: {exc}") from exc
    if not all(math.isfinite(value) for value in values.values()):
        raise InvalidRecordError("non-finite probability")

    label = record.get("label")
    label = str(label) if label is not None else max(values, key=values.get)
    row: dict[str, Any] = {
        "timestamp": timestamp,
        "model_name": record.get("model_name"),
        "model_version": None
        if record.get("model_version") is None
        else str(record["model_version"]),
        **{f"{PROBABILITY_PREFIX}{name}": value for name, value in values.items()},
        "label": label,
        "confidence": max(values.values()),
        **_face_columns(record, label),
    }
    # A record without input properties still counts for the prediction columns.
    inputs = record.get("input") if isinstance(record.get("input"), dict) else {}
    for column in INPUT_COLUMNS:
        row[column] = inputs.get(column)
    return row


def _face_columns(record: dict[str, Any], label: str) -> dict[str, Any]:
    """Return `faces_<class>` counts and `face_found` (True, False or None when unknown)."""
    counts = record.get("face_counts")
    if counts is None:
        # A line from before faces were logged: one image, taken as one face of its label.
        counts = {label: 1}
    if not isinstance(counts, dict):
        raise InvalidRecordError(f"face_counts is not an object: {counts!r}")
    columns: dict[str, Any] = {}
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidRecordError(f"face count of {name!r} is not a count: {count!r}")
        columns[f"{FACE_COUNT_PREFIX}{name}"] = count
    found = record.get("face_found")
    columns["face_found"] = found if isinstance(found, bool) else None
    return columns


def _read_file(
    path: Path, since: datetime | None, until: datetime | None, result: PredictionLog
) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            result.lines += 1
            try:
                row = flatten_record(json.loads(line))
            except (json.JSONDecodeError, RecursionError, InvalidRecordError) as exc:
                result.skipped_lines += 1
                if result.skipped_lines <= 3:
                    log.warning("Skipping line %d of %s: %s", line_number, path, exc)
                continue
            timestamp = row["timestamp"]
            if (since is None or timestamp >= since) and (until is None or timestamp < until):
                rows.append(row)
    return rows


def load_prediction_log(
    path: str | Path,
    since: datetime | None = None,
    until: datetime | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
) -> PredictionLog:
    """Read the predictions logged in `[since, until)` from `path` and its rotated files.

    Invalid lines are skipped and counted, and unreadable files are skipped and listed, so
    nothing in the log's content raises. A missing log gives an empty frame.

    Args:
        path: The current log file, such as `logs/predictions.jsonl`.
        since: Earliest timestamp kept, inclusive; None keeps everything before `until`.
        until: Timestamp at which the window ends, exclusive; None means no end.
        model_name: Keep only predictions of this registered model, if given.
        model_version: Keep only predictions of this model version, if given.
    """
    since = parse_timestamp(since) if since is not None else None
    until = parse_timestamp(until) if until is not None else None
    result = PredictionLog(frame=pd.DataFrame())
    rows: list[dict[str, Any]] = []
    for file in log_files(Path(path)):
        try:
            # Every record is written after its timestamp, so a file last modified before
            # `since` contains nothing inside the window.
            modified = datetime.fromtimestamp(file.stat().st_mtime, UTC)
            if since is not None and modified < since:
                continue
            rows.extend(_read_file(file, since, until, result))
        except OSError as exc:
            log.warning("Cannot read the prediction log file %s: %s", file, exc)
            result.unreadable_files.append(file)
            continue
        result.files.append(file)
    if result.skipped_lines:
        log.warning("Skipped %d invalid lines in %s", result.skipped_lines, path)

    frame = pd.DataFrame(rows)
    if frame.empty:
        result.frame = pd.DataFrame(
            columns=[*META_COLUMNS, "label", "confidence", "face_found", *INPUT_COLUMNS]
        )
        return result
    of_model = pd.Series(True, index=frame.index)
    if model_name is not None:
        of_model &= frame["model_name"] == model_name
    if model_version is not None:
        of_model &= frame["model_version"] == str(model_version)
    result.other_models = int((~of_model).sum())
    result.frame = frame[of_model].sort_values("timestamp", kind="stable").reset_index(drop=True)
    return result
