"""Liveness and readiness. /health/live answers while the process does. /health/ready
checks the database (critical: 503 SERVICE_UNAVAILABLE when the event store or the read
models do not answer) and the signals that only make the service degraded (200, status
"degraded"): forecast queue depth, projection lag, events parked by a failing projector
and, once the cache exists, Redis."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Generic, Literal, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from infra.cache import CacheUnavailableError
from infra.errors import StoreUnavailableError
from infra.eventstore import EventLog
from infra.readstore import ReadStore
from infra.settings import Settings
from projections.readmodel import parked_table
from readapi.cache import ReadCache
from service import draining, errors
from service.status import CACHE_MESSAGE

STATUS_HEADER = "X-Service-Status"
MESSAGE_HEADER = "X-Service-Message"
# Queue depth over this share of forecast_queue_limit degrades the service (in fifths).
_QUEUE_FIFTHS = 4

T = TypeVar("T")


class Check(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One non-critical check: its value, the threshold over which it degrades."""

    status: Literal["ok", "degraded"]
    value: int | None = None
    threshold: int | None = None
    message: str | None = None


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok", "degraded"]
    checks: dict[str, Check]


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """How far the read models have got: the log's head position, each projection's
    tracking position, the forecast queue's depth, each projection's parked events and,
    when asked for, when the oldest event each lagging projection has not applied yet
    happened."""

    head: int
    positions: dict[str, int]
    queue_depth: int
    parked: dict[str, int] = {}
    behind_since: dict[str, datetime] = {}


def tracking_positions(store: ReadStore, projections: Sequence[str]) -> dict[str, int]:
    """Each read model's tracking position (0 before its first batch)."""
    # Table and projection names come from our own projector names, never from a request.
    statements = {
        name: f"SELECT '{name}' AS projection,"  # noqa: S608
        " COALESCE(MAX(notification_id), 0) AS position"
        f" FROM {store.tracking_table(name)} WHERE application_name = ?"
        for name in projections
    }
    if not statements:
        return {}
    if store.postgres:
        # All tracking tables live in the one database: one round trip.
        rows = store.query(
            projections[0],
            " UNION ALL ".join(statements.values()),
            [EventLog.name] * len(statements),
        )
    else:
        # One file per read model on SQLite.
        rows = [
            row
            for name, sql in statements.items()
            for row in store.query(name, sql, [EventLog.name])
        ]
    return {str(row["projection"]): int(row["position"]) for row in rows}


def parked_counts(store: ReadStore, projections: Sequence[str]) -> dict[str, int]:
    """Each read model's parked events (skipped after its projector kept failing)."""
    # Table and projection names come from our own projector names, never from a request.
    statements = {
        name: f"SELECT '{name}' AS projection, COUNT(*) AS parked"  # noqa: S608
        f" FROM {parked_table(name)}"
        for name in projections
    }
    if not statements:
        return {}
    if store.postgres:
        rows = store.query(projections[0], " UNION ALL ".join(statements.values()))
    else:
        rows = [row for name, sql in statements.items() for row in store.query(name, sql)]
    return {str(row["projection"]): int(row["parked"]) for row in rows}


def queue_depth(store: ReadStore) -> int:
    """Forecasts queued or running, all tenants."""
    [row] = store.query("queue", "SELECT COUNT(*) AS depth FROM queue_active")
    return int(row["depth"])


class SingleFlight(Generic[T]):
    """A blocking call run on a worker thread, at most one run at a time: concurrent callers
    share the run in flight (so a hung database holds one thread, not one per caller), and
    each caller waits at most ``timeout_s`` for it (then StoreUnavailableError)."""

    def __init__(self, call: Callable[[], T], *, timeout_s: float) -> None:
        self._call = call
        self._timeout_s = timeout_s
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(None, self._call)
            # A run that outlives its callers still has its outcome retrieved.
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), self._timeout_s)
        except TimeoutError:
            raise StoreUnavailableError(
                f"the database did not answer within {self._timeout_s:g} s"
            ) from None

    async def settle(self) -> None:
        """Waits (at most the timeout) for a run in flight, so the stores it uses are
        not closed under it."""
        if self._running is not None and not self._running.done():
            await asyncio.wait({self._running}, timeout=self._timeout_s)


class ReadinessProbe:
    """Runs the checks of /health/ready, and measures the same progress for /metrics.
    Readiness is polled (and metrics scraped) often, so each run is a few cheap statements,
    at most one run of each is in flight, and every poll answers within ``timeout_s``."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        store: ReadStore,
        projections: Sequence[str],
        *,
        cache: ReadCache | None = None,
    ) -> None:
        self._log = log
        self._store = store
        self._cache = cache
        self._projections = tuple(projections)
        self._queue_limit = settings.forecast_queue_limit
        self._max_lag = settings.max_projection_lag_events
        self._readiness = SingleFlight(self.check, timeout_s=settings.health_timeout_s)
        self._measure = SingleFlight(
            functools.partial(self.progress, ages=True), timeout_s=settings.health_timeout_s
        )

    async def readiness(self) -> Readiness:
        """The report; StoreUnavailableError when the database does not answer in time."""
        report = await self._readiness()
        if self._cache is None or self._cache.store is None:
            return report
        # The read cache is not critical: reads go to the database without it.
        try:
            await self._cache.store.ping()
            cache = Check(status="ok")
        except CacheUnavailableError:
            cache = Check(status="degraded", message=CACHE_MESSAGE)
        checks = {**report.checks, "cache": cache}
        degraded = any(c.status == "degraded" for c in checks.values())
        return Readiness(status="degraded" if degraded else "ok", checks=checks)

    async def settle(self) -> None:
        """Waits for the checks in flight (before the stores close)."""
        await self._readiness.settle()
        await self._measure.settle()

    async def degraded_reasons(self) -> dict[str, str]:
        """The degraded checks and their messages (for every response's headers)."""
        report = await self.readiness()
        return {
            name: check.message or "degraded"
            for name, check in report.checks.items()
            if check.status == "degraded" and name != "cache"
        }

    async def measure(self) -> Progress:
        """The progress with the age of what each projection has still to apply;
        StoreUnavailableError when the database does not answer in time."""
        return await self._measure()

    def check(self) -> Readiness:
        """One run of the checks (blocking); StoreUnavailableError when a store fails."""
        progress = self.progress()
        lag = progress.head - min(progress.positions.values(), default=progress.head)
        queue_threshold = self._queue_limit * _QUEUE_FIFTHS // 5
        checks = {
            "database": Check(status="ok"),
            "forecastQueue": _over(
                progress.queue_depth, queue_threshold, "forecast queue nearly full"
            ),
            "projectionLag": _over(lag, self._max_lag, "read models lag behind the log"),
            "parkedEvents": _over(
                sum(progress.parked.values()),
                0,
                "a projection skipped events it failed on: see `accubooks projections parked`",
            ),
        }
        degraded = any(c.status == "degraded" for c in checks.values())
        return Readiness(status="degraded" if degraded else "ok", checks=checks)

    def progress(self, *, ages: bool = False) -> Progress:
        """Head, positions and queue depth (blocking); with ``ages`` also when the oldest
        unapplied event of each lagging projection happened (one row read per distinct
        position, usually one). StoreUnavailableError when a store fails."""
        head = self._log.position()
        positions = tracking_positions(self._store, self._projections)
        depth = queue_depth(self._store)
        parked = parked_counts(self._store, self._projections)
        behind_since: dict[str, datetime] = {}
        if ages:
            seen: dict[int, datetime | None] = {}
            for name, position in positions.items():
                if position >= head:
                    continue
                if position not in seen:
                    seen[position] = self._log.occurred_after(position)
                found = seen[position]
                if found is not None:
                    behind_since[name] = found
        return Progress(
            head=head,
            positions=positions,
            queue_depth=depth,
            parked=parked,
            behind_since=behind_since,
        )


def _over(value: int, threshold: int, message: str) -> Check:
    if value > threshold:
        return Check(status="degraded", value=value, threshold=threshold, message=message)
    return Check(status="ok", value=value, threshold=threshold)


_encoder = msgspec.json.Encoder()


async def live(_: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def ready(request: Request) -> Response:
    if draining.is_draining(request):
        return errors.error_response(request, "SERVICE_UNAVAILABLE", "the process is draining")
    probe: ReadinessProbe = request.state.readiness
    try:
        report = await probe.readiness()
    except StoreUnavailableError as e:
        return errors.error_response(request, "SERVICE_UNAVAILABLE", e.message)
    headers: dict[str, str] = {}
    if report.status == "degraded":
        headers[STATUS_HEADER] = "degraded"
        headers[MESSAGE_HEADER] = "; ".join(
            f"{name}: {check.message}"
            for name, check in report.checks.items()
            if check.status == "degraded"
        )
    return Response(_encoder.encode(report), media_type="application/json", headers=headers)


routes = [
    Route("/health/live", live, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
]
