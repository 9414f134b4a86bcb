"""`GET /drift` and `GET /driftsummary`: drift of the logged predictions, class rates, faces.

The app provides `app.state.settings` (with `prediction_log` and `tracking_uri`) and
`app.state.bundle` (the served model, with `run_id`, `name` and `version`). Both handlers are
plain functions, so FastAPI runs them in its thread pool and the Evidently run does not block
the event loop. `facemask.monitoring.drift` (pandas and MLflow, then Evidently) is imported on
the first call, so a server that never reports drift does not load them.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["monitoring"])

# A year of hours; a longer window would read every rotated log file to find nothing new.
_MAX_HOURS = 24 * 366


def _model_info(bundle: Any) -> dict[str, Any]:
    return {
        "name": getattr(bundle, "name", None),
        "version": None if getattr(bundle, "version", None) is None else str(bundle.version),
        "run_id": getattr(bundle, "run_id", None),
    }


@router.get("/drift")
def drift(
    request: Request,
    hours: float = Query(24.0, gt=0, le=_MAX_HOURS, description="Window length in hours."),
    min_rows: int | None = Query(
        None,
        ge=1,
        description="Minimum number of predictions for a drift verdict; omit for the default "
        "in facemask.monitoring.drift.",
    ),
) -> JSONResponse:
    """Compare the served model's predictions in the last `hours` with its training reference."""
    from facemask.monitoring.drift import (
        DEFAULT_MIN_ROWS,
        ReferenceLoadError,
        ReferenceNotFoundError,
        describe_log,
        drift_summary,
        face_summary,
        load_prediction_log,
        load_reference,
        window_for_hours,
    )

    settings = request.app.state.settings
    bundle = getattr(request.app.state, "bundle", None)
    if bundle is None or not getattr(bundle, "run_id", None):
        log.warning("GET /drift: the served model has no training run id, so no reference")
        return JSONResponse(
            {"status": "no_model", "message": "no model with a training run id is loaded"},
            status_code=503,
        )
    model = _model_info(bundle)
    try:
        reference = load_reference(bundle.run_id, settings.tracking_uri)
    except ReferenceNotFoundError as exc:
        log.warning("GET /drift: %s", exc)
        return JSONResponse(
            {"status": "no_reference", "message": str(exc), "model": model}, status_code=404
        )
    except ReferenceLoadError as exc:
        log.error("GET /drift: %s", exc)
        return JSONResponse(
            {"status": "reference_unavailable", "message": str(exc), "model": model},
            status_code=503,
        )

    since, until = window_for_hours(hours)
    # Predictions of other model versions are not comparable with this run's reference.
    prediction_log = load_prediction_log(
        settings.prediction_log,
        since=since,
        until=until,
        model_name=model["name"],
        model_version=model["version"],
    )
    summary = drift_summary(
        reference,
        prediction_log.frame,
        min_rows=DEFAULT_MIN_ROWS if min_rows is None else min_rows,
    )
    return JSONResponse(
        {
            **summary,
            **face_summary(prediction_log.frame),
            "model": model,
            "window": describe_log(prediction_log, since, until),
        }
    )


@router.get("/driftsummary")
def driftsummary(
    request: Request,
    hours: float | None = Query(
        None, gt=0, le=_MAX_HOURS, description="Window length in hours; omit for the whole log."
    ),
) -> JSONResponse:
    """Count the logged predictions, the rate of each predicted class and the faces per class."""
    from facemask.monitoring.drift import load_prediction_log, prediction_summary, window_for_hours

    settings = request.app.state.settings
    since, until = window_for_hours(hours) if hours is not None else (None, None)
    prediction_log = load_prediction_log(settings.prediction_log, since=since, until=until)
    return JSONResponse(prediction_summary(prediction_log.frame))
