"""Degradation on every response: while the service is degraded (the read cache is
failing, the forecast queue is nearly full, the read models lag), every answer carries
``X-Service-Status: degraded`` and ``X-Service-Message`` saying why, so clients see it
without polling /health/ready.

The slow signals come from the readiness checks, re-run in the background by each API
process every ``status_refresh_s``; the cache's own state (its circuit breaker, or a
failure during this very request) is read as each response starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from infra.errors import InfraError
from readapi.cache import ReadCache
from readapi.serving import CACHE_FAILED

logger = logging.getLogger("accubooks.status")

STATUS_HEADER = "X-Service-Status"
MESSAGE_HEADER = "X-Service-Message"
STATE_KEY = "service_status"
CACHE_MESSAGE = "cache unavailable: reads are served from the database"


class ServiceStatus:
    def __init__(self, cache: ReadCache) -> None:
        self._cache = cache
        # From the last background readiness run: check name -> message.
        self.reasons: dict[str, str] = {}

    def message(self, *, cache_failed: bool = False) -> str | None:
        """Why the service is degraded now (None when it is not)."""
        reasons = dict(self.reasons)
        if cache_failed or self._cache.unavailable:
            reasons["cache"] = CACHE_MESSAGE
        if not reasons:
            return None
        return "; ".join(f"{name}: {text}" for name, text in sorted(reasons.items()))

    async def refresh_forever(
        self, readiness: Callable[[], Awaitable[dict[str, str]]], every_s: float
    ) -> None:
        """Re-runs the readiness checks until cancelled."""
        while True:
            try:
                self.reasons = await readiness()
            except InfraError as e:
                self.reasons = {"database": e.message}
            except Exception:
                logger.exception("the background readiness check failed")
            await asyncio.sleep(every_s)


def mark_degraded(headers: list[tuple[bytes, bytes]], state: dict[str, Any]) -> None:
    """Adds the degraded-status headers to an answer's ``headers`` while the service is
    degraded (the app's request middleware calls it as each response starts)."""
    status: ServiceStatus | None = state.get(STATE_KEY)
    if status is None:
        return
    text = status.message(cache_failed=bool(state.get(CACHE_FAILED)))
    # A route that judged its own status (/health/ready) keeps its headers.
    if text is not None and not any(h[0] == b"x-service-status" for h in headers):
        headers.append((b"x-service-status", b"degraded"))
        headers.append((b"x-service-message", text.encode("latin-1", "replace")))
