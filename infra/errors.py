"""Errors raised at the infrastructure boundary and on malformed requests.

Each error has a stable ``code``; the service maps codes to HTTP statuses in one place.
Driver errors never pass this boundary: they are translated into these.
"""

from __future__ import annotations

from typing import Any


class InfraError(Exception):
    """Base of the errors this package raises."""

    code = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.operation = operation


class RequestValidationError(InfraError):
    """Raised when a request body, header or query parameter is malformed."""

    code = "VALIDATION_ERROR"


class PayloadTooLargeError(InfraError):
    """Raised when a request body is over the size limit."""

    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaTypeError(InfraError):
    """Raised when a request body is not declared as JSON."""

    code = "UNSUPPORTED_MEDIA_TYPE"


class UnauthorizedError(InfraError):
    """Raised when a request has no API key, or one that is unknown or revoked."""

    code = "UNAUTHORIZED"


class ForbiddenError(InfraError):
    """Raised when the key's role may not use the route."""

    code = "FORBIDDEN"


class StoreUnavailableError(InfraError):
    """Raised when the event store cannot be reached or does not answer."""

    code = "SERVICE_UNAVAILABLE"


class RecordConflictError(InfraError):
    """Raised when a save collides with a concurrent one (a version or id already taken);
    nothing of the save was written."""

    code = "RECORD_CONFLICT"


class OperationTimeoutError(InfraError):
    """Raised when a database statement runs over its budget (cancelled by the server,
    or abandoned by the client when the server does not answer)."""

    code = "OPERATION_TIMEOUT"
