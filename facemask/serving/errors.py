"""JSON error responses of the service: `{"error": {"code": ..., "message": ...}}`.

Messages name what was wrong with the request and never include server paths, stack traces or
upload file names.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from facemask.data.images import SUPPORTED_FORMATS, ImageTooLargeError, InvalidImageError
from facemask.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)

SUPPORTED_FORMATS_TEXT = ", ".join(SUPPORTED_FORMATS)

# Codes of the errors that Starlette and FastAPI raise themselves (unknown routes, parse errors).
_CODES_BY_STATUS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "content_too_large",
    415: "unsupported_media_type",
}


class ApiError(StarletteHTTPException):
    """A request error with a stable machine-readable `code` and a message for people.

    It subclasses Starlette's HTTPException so that FastAPI passes it through unchanged when it
    is raised while the request body is being parsed.
    """

    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(status_code=status_code, detail=message)
        self.code = code
        self.message = message


def image_error(exc: InvalidImageError) -> ApiError:
    """Map a decode failure to 413 (too many pixels), 415 (not an image) or 400 (corrupt)."""
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, "image_too_large", f"The image is too large: {exc}.")
    if isinstance(exc.__cause__, UnidentifiedImageError):
        return ApiError(
            415,
            "unsupported_image",
            f"The upload is not an image in a supported format ({SUPPORTED_FORMATS_TEXT}).",
        )
    return ApiError(
        400,
        "invalid_image",
        f"The image is truncated or corrupt and could not be decoded ({exc}). "
        f"Supported formats: {SUPPORTED_FORMATS_TEXT}.",
    )


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """Return the JSON body of an error response."""
    return {"error": {"code": code, "message": message}}


def api_error_response(
    exc: ApiError, request_id: str | None, metrics: ServiceMetrics | None
) -> JSONResponse:
    """Log and count a rejected request and return its JSON error response."""
    if metrics is not None:
        metrics.rejected_inputs.labels(code=exc.code).inc()
    log.warning(
        "Request %s rejected with %d %s: %s", request_id, exc.status_code, exc.code, exc.message
    )
    return JSONResponse(
        error_body(exc.code, exc.message), status_code=exc.status_code, headers=exc.headers
    )


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    metrics = getattr(request.app.state, "metrics", None)
    return api_error_response(exc, _request_id(request), metrics)


async def _handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _CODES_BY_STATUS.get(status, f"http_{status}")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    log.warning("Request %s failed with %d: %s", _request_id(request), status, message)
    return JSONResponse(error_body(code, message), status_code=status, headers=exc.headers)


def _describe_validation_error(error: dict) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    if error.get("type") == "missing":
        return f"the form field {location!r} is missing"
    return f"{location or 'request'}: {error.get('msg', 'invalid value')}"


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = "; ".join(_describe_validation_error(error) for error in exc.errors())
    message = f"Invalid request: {details}."
    log.warning("Request %s failed validation: %s", _request_id(request), details)
    return JSONResponse(error_body("invalid_request", message), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Render API, HTTP and validation errors as JSON error bodies."""
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
