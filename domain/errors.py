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
