"""Errors of the projections package."""

from __future__ import annotations


class ProjectionError(Exception):
    """The base of the errors raised by the projections package."""


class RebuildError(ProjectionError):
    """Raised when a rebuild cannot go on: another rebuild runs, a worker holds a read
    model that should be switched, a live model went back behind the rebuild, readers
    kept a switched model's tables busy, or a table cannot be compared (no primary key)."""
