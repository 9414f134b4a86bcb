"""`POST /predict` and `POST /predict/batch`: classify uploaded images and log each prediction.

Each image is searched for faces (unless the face stage is off), and every face crop goes
through the micro-batcher as one model input, so the faces of one request and of concurrent
requests share model calls.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import PureWindowsPath
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, File, Query, Request, UploadFile

from facemask.data.images import InvalidImageError
from facemask.serving.batching import MicroBatcher
from facemask.serving.errors import ApiError, error_body, image_error
from facemask.serving.faces import face_json
from facemask.serving.predictor import Prediction, Predictor, PreparedImage

log = logging.getLogger(__name__)

router = APIRouter(tags=["prediction"])

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Empty, truncated or corrupt image"},
    413: {"description": "Upload, image or batch over the configured limits"},
    415: {"description": "Not an image in a supported format"},
    422: {"description": "The form field is missing, or a query parameter is invalid"},
    503: {"description": "The model is not ready yet"},
}

FacesQuery = Annotated[
    bool,
    Query(
        description="Classify each face found in the image; false classifies the whole image. "
        "The face stage runs only when the server's `faces` setting is also true."
    ),
]


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


def _prepare_all(predictor: Predictor, items: list[bytes | ApiError], faces: bool) -> list[Any]:
    prepared: list[PreparedImage | ApiError] = []
    for item in items:
        if isinstance(item, ApiError):
            prepared.append(item)
            continue
        try:
            prepared.append(predictor.prepare(item, faces))
        except InvalidImageError as exc:
            prepared.append(image_error(exc))
    return prepared


async def _run_predictions(
    request: Request, items: list[bytes | ApiError], faces: bool
) -> list[Prediction | ApiError]:
    """Prepare every item and classify the regions of the valid ones through the micro-batcher.

    Items that are or become errors keep their place in the returned list.
    """
    state = request.app.state
    batcher: MicroBatcher = state.batcher
    predictor: Predictor = state.predictor
    uploads = sum(not isinstance(item, ApiError) for item in items)
    with batcher.preparing(uploads) as reservation:
        # Decoding and face detection run in worker threads, so the event loop keeps
        # responding to /health.
        prepared = await anyio.to_thread.run_sync(
            _prepare_all, predictor, items, faces, limiter=state.prepare_limiter
        )
        valid = [item for item in prepared if isinstance(item, PreparedImage)]
        # NOTE: a batch request keeps all its model inputs in memory at once, up to
        # max_batch_files x max_faces of them: 32 x 32 x 588 KiB = 588 MiB at 224 px.
        inputs = [array for image in valid for array in image.arrays]
        rows = await batcher.submit(inputs, reservation) if inputs else []
    results: list[Prediction | ApiError] = []
    start = 0
    for item in prepared:
        if isinstance(item, ApiError):
            results.append(item)
            continue
        end = start + len(item.arrays)
        results.append(predictor.result(item, rows[start:end]))
        start = end
    return results


def _prediction_json(prediction: Prediction) -> dict[str, Any]:
    """Return the fields of one image's result: class probabilities, label and faces."""
    return {
        **prediction.probabilities,
        "label": prediction.label,
        "face_found": prediction.face_found,
        "face_search": prediction.face_search,
        "faces": [face_json(face) for face in prediction.faces],
        "counts": prediction.counts,
    }


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
            "face_counts": prediction.counts,
            # null when the face stage did not run, so nothing is known about faces.
            "face_found": prediction.face_found if prediction.face_search else None,
            "latency_ms": latency_ms,
            "input": prediction.properties,
        }
        if batch_index is not None:
            record["batch_index"] = batch_index
        records.append(record)
        state.metrics.observe_prediction(prediction.label, prediction.counts)
        if prediction.face_search and not prediction.face_found:
            state.metrics.images_without_face.inc()

    def write_all() -> int:
        return sum(not state.prediction_log.write(record) for record in records)

    failures = await anyio.to_thread.run_sync(write_all)
    if failures:
        state.metrics.prediction_log_failures.inc(failures)


@router.post("/predict", responses=_ERROR_RESPONSES)
async def predict(
    request: Request,
    file: Annotated[UploadFile, File(description="One image: JPEG, PNG, WEBP, GIF, BMP, TIFF.")],
    faces: FacesQuery = True,
) -> dict[str, Any]:
    """Classify one image and each face in it.

    Returns one image-level probability per class, the label, `counts` (faces per class),
    `face_found`, `face_search` and the model version. `faces` has the box in the image's
    pixels, detector score, probabilities and label of each face, or one whole-image entry when
    no face was found.
    """
    started = request.state.started
    _require_ready(request)
    data = await _read_upload(file, request.app.state.settings.max_upload_bytes)
    [result] = await _run_predictions(request, [data], faces)
    if isinstance(result, ApiError):
        raise result
    await _log_predictions(request, [(None, result)], started)
    return {
        **_prediction_json(result),
        "model_version": request.app.state.bundle.version,
        "request_id": request.state.request_id,
    }


@router.post("/predict/batch", responses=_ERROR_RESPONSES)
async def predict_batch(
    request: Request,
    files: Annotated[list[UploadFile], File(description="Several images, classified in order.")],
    faces: FacesQuery = True,
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
    outcomes = await _run_predictions(request, items, faces)

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
        results.append({"filename": filename, **_prediction_json(outcome)})
        logged.append((index, outcome))
    await _log_predictions(request, logged, started)
    return {
        "results": results,
        "model_version": request.app.state.bundle.version,
        "request_id": request.state.request_id,
    }
