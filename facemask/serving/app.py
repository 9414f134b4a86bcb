"""The FastAPI app of the prediction service."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image

from facemask import __version__
from facemask.serving.batching import MicroBatcher
from facemask.serving.drift_routes import router as drift_router
from facemask.serving.errors import install_error_handlers
from facemask.serving.faces import build_face_stage, describe_face_stage
from facemask.serving.metrics import ServiceMetrics
from facemask.serving.middleware import RequestContextMiddleware, UploadLimitMiddleware
from facemask.serving.model_store import ModelBundle
from facemask.serving.prediction_log import PredictionLog
from facemask.serving.prediction_routes import router as prediction_router
from facemask.serving.predictor import Predictor
from facemask.serving.served_model import ServedModel, served_from_bundle
from facemask.serving.settings import ServeSettings

log = logging.getLogger(__name__)

# Room for the multipart boundaries and part headers around each file, in bytes. Uploads are
# checked against `max_upload_bytes` per file after parsing; this only bounds the raw body.
MULTIPART_OVERHEAD_BYTES = 16 * 1024


def _warm_up(predictor: Predictor) -> None:
    """Classify one grey JPEG through the whole request path (decode, faces, transform, model)."""
    size = predictor.bundle.preprocessing.image_size
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="JPEG")
    predictor.predict(buffer.getvalue())


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    # Decoding is CPU work that releases the GIL in Pillow and OpenCV, so one thread per CPU.
    state.prepare_limiter = anyio.CapacityLimiter(len(os.sched_getaffinity(0)))
    await anyio.to_thread.run_sync(_warm_up, state.predictor)
    state.batcher.start()
    state.ready = True
    log.info(
        "Ready: model %s version %s, runtime %s, face stage %s, micro-batches of up to %d "
        "model inputs",
        state.bundle.uri,
        state.bundle.version,
        state.bundle.runtime,
        "on" if state.predictor.face_stage is not None else "off",
        state.settings.max_batch_size,
    )
    try:
        yield
    finally:
        state.ready = False
        await state.batcher.stop()
        state.prediction_log.close()
        log.info("Shut down the app of model %s", state.bundle.uri)


def _model_description(bundle: ServedModel, predictor: Predictor) -> dict[str, Any]:
    size = bundle.preprocessing.image_size
    return {
        "name": bundle.name,
        "version": bundle.version,
        "alias": bundle.alias,
        "run_id": bundle.run_id,
        "uri": bundle.uri,
        "classes": bundle.class_names,
        "input_size": [3, size, size],
        "preprocessing": bundle.preprocessing.to_dict(),
        "test_metrics": bundle.test_metrics,
        "runtime": bundle.runtime,
        "face_stage": describe_face_stage(predictor.face_stage, bundle.face_settings),
    }


def _add_status_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["status"])
    async def health() -> dict[str, str]:
        """Liveness: return 200 while the process runs, without touching the model."""
        return {"status": "ok"}

    @app.get("/ready", tags=["status"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: return 200 once the model is loaded and warmed up, 503 before."""
        if request.app.state.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not_ready"}, status_code=503)

    @app.get("/info", tags=["status"])
    async def info(request: Request) -> dict[str, Any]:
        """Describe the served model: registry entry, run, classes, input, metrics, face stage."""
        state = request.app.state
        return _model_description(state.bundle, state.predictor)

    # The response class only sets the documented media type: the handler returns its own.
    @app.get("/metrics", tags=["status"], response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        """Return the Prometheus metrics in the text exposition format."""
        service_metrics: ServiceMetrics = request.app.state.metrics
        return Response(service_metrics.render(), media_type=service_metrics.content_type)


def create_app(settings: ServeSettings, bundle: ServedModel | ModelBundle) -> FastAPI:
    """Build the app that serves `bundle`.

    A PyTorch `ModelBundle` from `load_model_bundle` is served with the torch runtime in
    float32. With `settings.faces`, a bundle without a loaded face stage gets one built from its
    face stage settings. `GET /ready` returns 503 and `POST /predict` is rejected until the
    lifespan startup has run one image through the model; ASGI servers and
    `with TestClient(app)` run it.

    Raises:
        ModelLoadError: The face stage is on and its detector cannot be loaded.
    """
    if isinstance(bundle, ModelBundle):
        bundle = served_from_bundle(bundle)
    if settings.faces and bundle.face_stage is None:
        bundle = dataclasses.replace(bundle, face_stage=build_face_stage(bundle.face_settings))
    app = FastAPI(
        title="facemask prediction service",
        version=__version__,
        description="Classify photos as mask / no_mask with a model from the MLflow registry.",
        lifespan=_lifespan,
    )
    metrics = ServiceMetrics(bundle)
    app.state.settings = settings
    app.state.bundle = bundle
    app.state.metrics = metrics
    predictor = Predictor(bundle, settings.max_pixels, faces=settings.faces)
    app.state.predictor = predictor
    app.state.batcher = MicroBatcher(
        predictor.infer,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        workers=settings.inference_workers,
        on_batch=metrics.observe_batch,
    )
    app.state.prediction_log = PredictionLog(
        settings.prediction_log,
        max_bytes=settings.prediction_log_max_bytes,
        backups=settings.prediction_log_backups,
    )
    app.state.ready = False

    install_error_handlers(app)
    _add_status_routes(app)
    app.include_router(prediction_router)
    app.include_router(drift_router)

    per_file = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        UploadLimitMiddleware,
        limits={"/predict": per_file, "/predict/batch": per_file * settings.max_batch_files},
    )
    # Added last, so it is the outer one and also renders the upload limit's rejections.
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
