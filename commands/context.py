"""What every command handler is given: its collaborators (the event log, a clock, an id
source) and the caller (tenant, key, request, idempotency key)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from commands.errors import IdempotencyKeyInvalidError, IdempotencyKeyMissingError
from domain.events import Actor
from infra.eventstore import EventLog

_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


@dataclass(frozen=True)
class QueueLimits:
    """Admission control of forecasts: how many may be queued or running at once."""

    # (all tenants, this tenant) forecasts queued or running now.
    depth: Callable[[UUID], tuple[int, int]]
    total: int = 100
    per_tenant: int = 20


@dataclass(frozen=True)
class Collaborators:
    log: EventLog
    clock: Callable[[], datetime]
    new_id: Callable[[], UUID]
    # Bounded retries when a concurrent command changed the aggregate first.
    attempts: int = 20
    # None: no admission control (operator tools that request no forecasts).
    queue: QueueLimits | None = None


@dataclass(frozen=True)
class CommandContext:
    actor: Actor
    idempotency_key: str


def checked_idempotency_key(value: str | None) -> str:
    if value is None:
        raise IdempotencyKeyMissingError("the Idempotency-Key header is required on commands")
    if not _IDEMPOTENCY_KEY.match(value) or not value.strip():
        raise IdempotencyKeyInvalidError("Idempotency-Key must be 1-255 printable ASCII characters")
    return value
