"""Errors raised while answering a read. Each has a stable ``code``; the service maps
codes to HTTP statuses in one place."""

from __future__ import annotations


class ReadError(Exception):
    """Base of the errors this package raises."""

    code = "READ_ERROR"


class NotFoundError(ReadError):
    """Raised when the resource does not exist or belongs to another tenant (never 403)."""

    code = "NOT_FOUND"


class InvalidCursorError(ReadError):
    """Raised when a paging cursor is malformed, tampered with, or another tenant's."""

    code = "INVALID_CURSOR"


class QueryValidationError(ReadError):
    """Raised when a query parameter is unknown, not an integer, or out of range."""

    code = "VALIDATION_ERROR"


class ReadYourWritesTimeoutError(ReadError):
    """Raised when the read models did not reach a read's X-Consistency-Token in time."""

    code = "OPERATION_TIMEOUT"
    operation = "read_your_writes"
