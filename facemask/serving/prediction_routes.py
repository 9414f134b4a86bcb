"""`POST /predict` and `POST /predict/batch`: classify uploaded images and log each prediction."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import PureWindowsPath
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, File, Request, UploadFile

from facemask.data.images import InvalidImageError
from facemask.serving.batching import MicroBatcher
from facemask.serving.errors import ApiError, error_body, image_error
from facemask.serving.predictor import Prediction, Predictor, PreparedImage

log = logging.getLogger(__name__)

router = APIRouter(tags=["prediction"])

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Empty, truncated or corrupt image"},
    413: {"description": "Upload, image or batch over the configured limits"},
    415: {"description": "Not an image in a supported format"},
    422: {"description": "The form field is missing"},
    503: {"description": "The model is not ready yet"},
}


def _require_ready(request: Request) -> None:
    if not request.app.state.ready:
        raise ApiError(
            503, "not_ready", "The model is not ready yet; retry when GET /ready returns 200."
        )


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """Return the upload's bytes, rejecting empty files and files over `max_bytes`."""
    if upload.size is not None and upload.size > max_bytes:
        raise ApiError(
            413,
            "upload_too_large",
            f"The file has {upload.size} bytes, over the limit of {max_bytes} bytes.",
        )
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"The file is over the limit of {max_bytes} bytes.")
    if not data:
        raise ApiError(400, "empty_file", "The uploaded file is empty.")
    return data


def _prepare_all(predictor: Predictor, items: list[bytes | ApiError]) -> list[Any]:
    prepared: list[PreparedImage | ApiError] = []
    for item in items:
        if isinstance(item, ApiError):
            prepared.append(item)
            continue
        try:
            prepared.append(predictor.prepare(item))
        except InvalidImageError as exc:
            prepared.append(image_error(exc))
    return prepared


async def _run_predictions(
    request: Request, items: list[bytes | ApiError]
) -> list[Prediction | ApiError]:
    """Prepare every item and classify the valid ones through the micro-batcher.

    Items that are or become errors keep their place in the returned list.
    """
    state = request.app.state
    batcher: MicroBatcher = state.batcher
    uploads = sum(not isinstance(item, ApiError) for item in items)
    with batcher.preparing(uploads) as reservation:
        # Decoding runs in worker threads, so the event loop keeps responding to /health.
        prepared = await anyio.to_thread.run_sync(
            _prepare_all, state.predictor, items, limiter=state.prepare_limiter
        )
        valid = [item for item in prepared if isinstance(item, PreparedImage)]
        results = await batcher.submit(valid, reservation) if valid else []
    predictions = iter(results)
    return [item if isinstance(item, ApiError) else next(predictions) for item in prepared]


async def _log_predictions(
    request: Request, predictions: list[tuple[int | None, Prediction]], started: float
) -> None:
    state = request.app.state
    bundle = state.bundle
    request_id = request.state.request_id
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    timestamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    records = []
    for batch_index, prediction in predictions:
        record = {
            "timestamp": timestamp,
            "request_id": request_id,
            "model_name": bundle.name,
            "model_version": bundle.version,
            "probabilities": prediction.probabilities,
            "label": prediction.label,
            "latency_ms": latency_ms,
            "input": prediction.properties,
        }
        if batch_index is not None:
            record["batch_index"] = batch_index
        records.append(record)
        state.metrics.predictions.labels(label=prediction.label).inc()

    def write_all() -> int:
        return sum(not state.prediction_log.write(record) for record in records)

    failures = await anyio.to_thread.run_sync(write_all)
    if failures:
        state.metrics.prediction_log_failures.inc(failures)


@router.post("/predict", responses=_ERROR_RESPONSES)
async def predict(
    request: Request,
    file: Annotated[UploadFile, File(description="One image: JPEG, PNG, WEBP, GIF, BMP, TIFF.")],
) -> dict[str, Any]:
    """Classify one image; returns one probability per class, the label and the model version."""
    started = request.state.started
    _require_ready(request)
    data = await _read_upload(file, request.app.state.settings.max_upload_bytes)
    [result] = await _run_predictions(request, [data])
    if isinstance(result, ApiError):
        raise result
    await _log_predictions(request, [(None, result)], started)
    return {
        **result.probabilities,
        "label": result.label,
        "model_version": request.app.state.bundle.version,
        "request_id": request.state.request_id,
    }


@router.post("/predict/batch", responses=_ERROR_RESPONSES)
async def predict_batch(
    request: Request,
    files: Annotated[list[UploadFile], File(description="Several images, classified in order.")],
) -> dict[str, Any]:
    """Classify several images; a bad file gets an `error` entry instead of failing the batch."""
    started = request.state.started
    _require_ready(request)
    settings = request.app.state.settings
    if len(files) > settings.max_batch_files:
        raise ApiError(
            413,
            "too_many_files",
            f"The batch has {len(files)} files, over the limit of {settings.max_batch_files}.",
        )
    items: list[bytes | ApiError] = []
    for upload in files:
        try:
            items.append(await _read_upload(upload, settings.max_upload_bytes))
        except ApiError as exc:
            items.append(exc)
    outcomes = await _run_predictions(request, items)

    results: list[dict[str, Any]] = []
    logged: list[tuple[int | None, Prediction]] = []
    for index, (upload, outcome) in enumerate(zip(files, outcomes, strict=True)):
        # Only the base name is echoed: some clients send the full path of the file they read.
        # PureWindowsPath splits at both "/" and "\\".
        filename = PureWindowsPath(upload.filename or "").name or None
        if isinstance(outcome, ApiError):
            log.warning(
                "Request %s: batch file %d rejected with %d %s: %s",
                request.state.request_id,
                index,
                outcome.status_code,
                outcome.code,
                outcome.message,
            )
            request.app.state.metrics.rejected_inputs.labels(code=outcome.code).inc()
            results.append({"filename": filename, **error_body(outcome.code, outcome.message)})
            continue
        results.append({"filename": filename, **outcome.probabilities, "label": outcome.label})
        logged.append((index, outcome))
    await _log_predictions(request, logged, started)
    return {
        "results": results,
        "model_version": request.app.state.bundle.version,
        "request_id": request.state.request_id,
    }
