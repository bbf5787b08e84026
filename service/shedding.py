"""Load shedding: a bound on the requests one process has in flight. Beyond it a request
is answered at once with 503 OVERLOADED (the envelope, Retry-After); it never waits in a
queue. Health and metrics are never shed: an overloaded process is still alive. The bound is
max_in_flight; with a latency target (ACCUBOOKS_SHED_LATENCY_TARGET_MS) it is lowered
while admitted requests take longer than the target and raised back when they are faster
(Gate.finished), so that a workload whose requests are costly is held at the concurrency
its latency allows, and a cheap one keeps the full bound.

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
# The adaptive bound (Gate.finished).
WINDOW_REQUESTS = 32
WINDOW_S = 0.1
MAX_CUT = 0.5
MAX_RAISE = 1.25
MIN_LIMIT = 4
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
        latency_target_s: float = 0.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        # The bound in force: max_in_flight, or less while admitted requests take longer
        # than latency_target_s (0: never less).
        self.limit = max_in_flight
        metrics.IN_FLIGHT_LIMIT.set(max_in_flight)
        self._limit = float(max_in_flight)
        self._target_s = latency_target_s
        self._window_n = 0
        self._window_s = 0.0
        self._window_started = time.monotonic()
        self.in_flight = 0
        self.request_id = request_id
        self._observe = observe
        self._shed_since_summary = 0
        self._summary_at = 0.0

    def full(self) -> bool:
        return self.in_flight >= self.limit

    def finished(self, duration_s: float) -> None:
        """An admitted request took ``duration_s``: every window of WINDOW_REQUESTS of them
        (and at least WINDOW_S), the bound moves by target / their mean duration, at most
        halved or raised by a quarter, within [MIN_LIMIT, max_in_flight] (once it lasted
        WINDOW_S, so that a burst's first requests do not decide alone). With the requests
        sharing a core, their mean duration is about the bound times a request's cost
        (Little's law), so the bound settles where the mean is the target."""
        if not self._target_s:
            return
        self._window_n += 1
        self._window_s += duration_s
        if self._window_n < WINDOW_REQUESTS:
            return
        now = time.monotonic()
        if now - self._window_started < WINDOW_S:
            return
        mean_s = self._window_s / self._window_n
        step = min(MAX_RAISE, max(MAX_CUT, self._target_s / mean_s)) if mean_s > 0 else MAX_RAISE
        floor = min(MIN_LIMIT, self.max_in_flight)
        self._limit = min(float(self.max_in_flight), max(float(floor), self._limit * step))
        limit = round(self._limit)
        if limit != self.limit:
            self.limit = limit
            metrics.IN_FLIGHT_LIMIT.set(limit)
        self._window_n = 0
        self._window_s = 0.0
        self._window_started = now

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
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            gate.in_flight -= 1
            gate.finished(time.perf_counter() - started)
