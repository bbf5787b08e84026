"""The wall clock, passed as a collaborator wherever time is recorded (never read inside
the domain)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)
