"""Errors raised while handling a command. Each has a stable ``code``; the service maps
codes to HTTP statuses in one place. A command that raises stores nothing.
"""

from __future__ import annotations


class CommandError(Exception):
    """Base of the errors this package raises."""

    code = "COMMAND_ERROR"


class IdempotencyKeyMissingError(CommandError):
    """Raised when a command request has no Idempotency-Key header."""

    code = "IDEMPOTENCY_KEY_MISSING"


class IdempotencyKeyInvalidError(CommandError):
    """Raised when the Idempotency-Key is not 1-255 printable ASCII characters."""

    code = "IDEMPOTENCY_KEY_INVALID"


class IdempotencyKeyReusedError(CommandError):
    """Raised when a key already answered a command with another route or body."""

    code = "IDEMPOTENCY_KEY_REUSED"


class IdempotencyKeyInUseError(CommandError):
    """Raised when concurrent commands kept colliding and the bounded retries ran out."""

    code = "IDEMPOTENCY_KEY_IN_USE"


class NotFoundError(CommandError):
    """Raised when the target does not exist or belongs to another tenant (never 403)."""

    code = "NOT_FOUND"


class VersionConflictError(CommandError):
    """Raised when If-Match names a version that is no longer the current one."""

    code = "VERSION_CONFLICT"


class QueueFullError(CommandError):
    """Raised when the forecasts queued or running, globally or for the tenant, are at
    their limit; nothing is appended, so the same key may be retried later."""

    code = "QUEUE_FULL"
    operation = "forecast_generation"
