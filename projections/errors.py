"""Errors of the projections package."""

from __future__ import annotations


class ProjectionError(Exception):
    """The base of the errors raised by the projections package."""


class RebuildError(ProjectionError):
    """Raised when a rebuild cannot go on: another rebuild runs, a worker holds a read
    model that should be switched, a live model went back behind the rebuild, readers
    kept a switched model's tables busy, or a table cannot be compared (no primary key)."""


class NotParkedError(ProjectionError):
    """Raised when a parked event is replayed that is not (or no longer) parked: another
    replay got there first."""


class ProjectionBlockedError(ProjectionError):
    """Raised by a projection worker that would park one more event than
    projection_max_parked allows: it stops and retries the batch instead."""
