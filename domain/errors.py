"""Errors the domain raises when a command breaks a business rule.

Each error has a stable ``code``; the service maps codes to HTTP statuses in one place.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every business-rule violation."""

    code = "DOMAIN_ERROR"


class ScenarioArchivedError(DomainError):
    """Raised when a change or a forecast is asked of an archived scenario."""

    code = "SCENARIO_ARCHIVED"


class KeyRevokedError(DomainError):
    """Raised when an already revoked API key is revoked again."""

    code = "KEY_REVOKED"


class ForeignTenantError(DomainError):
    """Raised when an actor of one tenant acts on another tenant's aggregate (to the
    caller it is indistinguishable from a missing one)."""

    code = "NOT_FOUND"


class ScenarioTypeChangeError(DomainError):
    """Raised when new assumptions are of another scenario type (the type is fixed)."""

    code = "VALIDATION_ERROR"


class UnknownRoleError(DomainError):
    """Raised when a key is issued with a role that does not exist."""

    code = "VALIDATION_ERROR"


class ForecastFinishedError(DomainError):
    """Raised when a completed or failed forecast is started, completed or failed again
    (a redelivered job finds its work already done)."""

    code = "FORECAST_FINISHED"
