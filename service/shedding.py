"""Load shedding: a bound on the requests one process has in flight. Beyond it a request
is answered at once with 503 OVERLOADED (the envelope, Retry-After); it never waits in a
queue. Health and metrics are never shed: an overloaded process is still alive.

Under overload most requests are shed, and each shed one costs the core the admitted ones
need (perf.overload_bench measures it against a served request). So the bound is checked
twice. First by the server's protocol (service.draining.SheddingProtocol), as soon as a
request's headers are parsed: it writes the answer itself, with no task, no ASGI
messages and no middleware, and records the request here (the shed counter, the
duration histogram under the route's template, and a WARNING with the count at most once
a second instead of an access line each). Then by this middleware, which keeps the bound
exact: requests admitted by the protocol in one turn of the loop only count as in flight
once their task runs, and servers other than ours (the tests' clients) have no protocol
check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from infra import metrics
from service import errors

EXEMPT_PREFIXES = ("/health/", "/metrics")
# At most one summary line this often while the protocol sheds requests.
SUMMARY_EVERY_S = 1.0

log = logging.getLogger("accubooks.shedding")


class Gate:
    """One app's in-flight bound, shared by its middleware and the server's protocol.
    ``request_id`` gives a request its id; ``observe`` times an answered request in the
    duration histogram (scope, status, seconds)."""

    def __init__(
        self,
        max_in_flight: int,
        *,
        request_id: Callable[[Scope], str],
        observe: Callable[[Scope, int, float], None],
    ) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.request_id = request_id
        self._observe = observe
        self._shed_since_summary = 0
        self._summary_at = 0.0

    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight

    def shed_by_protocol(self, scope: Scope, duration_s: float) -> None:
        """Records a request the protocol answered 503 OVERLOADED by itself."""
        metrics.SHED.inc()
        self._observe(scope, 503, duration_s)
        self._shed_since_summary += 1
        now = time.monotonic()
        if now - self._summary_at >= SUMMARY_EVERY_S:
            log.warning(
                "shed %d requests (503 OVERLOADED) with %d in flight",
                self._shed_since_summary,
                self.in_flight,
            )
            self._summary_at = now
            self._shed_since_summary = 0


class LoadSheddingMiddleware:
    def __init__(self, app: ASGIApp, *, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        gate = self.gate
        # A counter, not a semaphore: nothing waits for a slot. One event loop per
        # process and no await between the check and the increment, so no lock is needed.
        if gate.full():
            metrics.SHED.inc()
            response = errors.error_response(
                Request(scope), "OVERLOADED", errors.OVERLOADED_MESSAGE
            )
            await response(scope, receive, send)
            return
        gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            gate.in_flight -= 1
