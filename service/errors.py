"""The one place where errors become HTTP answers: every error, whatever raised it, leaves
in the envelope of API.md with its stable code. Anything unexpected is a logged 500."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from commands.errors import CommandError
from domain.errors import DomainError
from infra import metrics
from infra.errors import InfraError
from readapi.errors import ReadError

logger = logging.getLogger("accubooks.errors")

STATUS_BY_CODE: dict[str, int] = {
    "VALIDATION_ERROR": 400,
    "IDEMPOTENCY_KEY_MISSING": 400,
    "IDEMPOTENCY_KEY_INVALID": 400,
    "INVALID_CURSOR": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "VERSION_CONFLICT": 409,
    "IDEMPOTENCY_KEY_IN_USE": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "IDEMPOTENCY_KEY_REUSED": 422,
    "SCENARIO_ARCHIVED": 422,
    "KEY_REVOKED": 422,
    "QUEUE_FULL": 503,
    "OPERATION_TIMEOUT": 503,
    "OVERLOADED": 503,
    "SERVICE_UNAVAILABLE": 503,
}
RETRY_AFTER_S = 1


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    requestId: str | None = None
    details: list[dict[str, Any]] | None = None
    operation: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True):
    error: ErrorDetail


_encoder = msgspec.json.Encoder()


OVERLOADED_MESSAGE = "The service is overloaded. Please try again later."


def overloaded_body(request_id: str) -> bytes:
    """The 503 OVERLOADED envelope, for the server's protocol to answer without the app."""
    detail = ErrorDetail(code="OVERLOADED", message=OVERLOADED_MESSAGE, requestId=request_id)
    return _encoder.encode(ErrorEnvelope(detail))


def error_response(
    request: Request,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    operation: str | None = None,
    status: int | None = None,
) -> Response:
    status = status or STATUS_BY_CODE.get(code, 500)
    if code == "OPERATION_TIMEOUT":
        # Counted where the answer is made, so that every timeout answered is counted once.
        metrics.TIMEOUTS.labels(operation=operation or "unknown").inc()
    request_id = getattr(request.state, "request_id", None)
    body = ErrorEnvelope(
        ErrorDetail(
            code=code, message=message, requestId=request_id, details=details, operation=operation
        )
    )
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="accubooks"'
    if request_id:
        headers["X-Request-Id"] = request_id
    return Response(
        _encoder.encode(body), status_code=status, headers=headers, media_type="application/json"
    )


async def on_known_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError | CommandError | InfraError | ReadError)
    if isinstance(exc, InfraError):
        return error_response(
            request, exc.code, exc.message, details=exc.details, operation=exc.operation
        )
    return error_response(request, exc.code, str(exc), operation=getattr(exc, "operation", None))


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(request, "NOT_FOUND", "no such route")
    if exc.status_code == 405:
        response = error_response(request, "METHOD_NOT_ALLOWED", "method not allowed on this route")
        # A 405 must name what is allowed (RFC 9110); Starlette computed it.
        response.headers.update(exc.headers or {})
        return response
    code = "VALIDATION_ERROR" if exc.status_code < 500 else "INTERNAL_ERROR"
    return error_response(request, code, str(exc.detail), status=exc.status_code)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    # The same request id as the access log line and the answer, so one search finds all.
    logger.error(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        exc_info=exc,
        extra={"request_id": getattr(request.state, "request_id", None)},
    )
    return error_response(request, "INTERNAL_ERROR", "internal error", status=500)


handlers = {
    DomainError: on_known_error,
    CommandError: on_known_error,
    InfraError: on_known_error,
    ReadError: on_known_error,
    HTTPException: on_http_error,
    Exception: on_unexpected_error,
}
