"""Load shedding: a bound on the requests one process has in flight. Beyond it a request
is answered at once with 503 OVERLOADED (the envelope, Retry-After); it never waits in a
queue. Health and metrics are never shed: an overloaded process is still alive."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from infra import metrics
from service import errors

EXEMPT_PREFIXES = ("/health/", "/metrics")


class LoadSheddingMiddleware:
    def __init__(self, app: ASGIApp, *, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        # A counter, not a semaphore: nothing waits for a slot. One event loop per
        # process and no await between the check and the increment, so no lock is needed.
        if self.in_flight >= self.max_in_flight:
            metrics.SHED.inc()
            response = errors.error_response(
                Request(scope), "OVERLOADED", "The service is overloaded. Please try again later."
            )
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
