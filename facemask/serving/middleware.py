"""ASGI middleware: request ids, access log, request metrics and upload size limits."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facemask.serving.errors import ApiError, api_error_response, error_body
from facemask.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)
# One line per request, under the package's logger name so one logging rule covers the service.
access_log = logging.getLogger("facemask.serving")

REQUEST_ID_HEADER = "X-Request-ID"
# Client-supplied ids outside this set are replaced, so a header cannot forge log lines.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(scope: Scope) -> str:
    supplied = Headers(scope=scope).get(REQUEST_ID_HEADER)
    if supplied and _VALID_REQUEST_ID.match(supplied):
        return supplied
    return uuid.uuid4().hex


def _printable(path: str) -> str:
    return path if path.isprintable() else repr(path)


class RequestContextMiddleware:
    """Give each request an id, log and count it, and turn uncaught errors into JSON 500s.

    The id comes from the `X-Request-ID` header when it is a plain token, else it is a new
    uuid4 hex. It is stored as `request.state.request_id` and sent back in the same header.
    `request.state.started` is the `time.perf_counter()` value when the request arrived.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = start
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ApiError as exc:
            # Raised by the upload limit before the routes see the request.
            if started:
                raise
            response = api_error_response(exc, request_id, self.metrics)
            await response(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "Request %s %s %s failed", request_id, scope["method"], _printable(scope["path"])
            )
            if started:
                raise
            message = (
                f"Internal server error; the server log has the details of request {request_id}."
            )
            response = JSONResponse(error_body("internal_error", message), status_code=500)
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(endpoint, scope["method"], status, elapsed)
            access_log.info(
                "request_id=%s method=%s path=%s status=%d latency_ms=%.1f",
                request_id,
                scope["method"],
                _printable(scope["path"]),
                status,
                elapsed * 1000,
            )


class UploadLimitMiddleware:
    """Reject request bodies over a per-path byte limit, before or while they are read.

    A declared Content-Length over the limit is rejected before any byte is read. Otherwise the
    body is counted chunk by chunk as the form parser receives it, and the request fails as soon
    as the count passes the limit. Both raise `ApiError` 413 `upload_too_large`.

    Args:
        app: The wrapped ASGI app.
        limits: Maximum body size in bytes of POST requests, by exact path.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int]):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = None
        if scope["type"] == "http" and scope["method"] == "POST":
            limit = self.limits.get(scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(f"declares {int(declared)} bytes", limit)

        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(f"passed {limit} bytes", limit)
            return message

        await self.app(scope, receive_with_limit, send)


def _too_large(detail: str, limit: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"The request body {detail}, over the limit of {limit} bytes for this endpoint.",
    )
