"""Liveness and readiness. /health/live answers while the process does. /health/ready
checks the database (critical: 503 SERVICE_UNAVAILABLE when the event store or the read
models do not answer) and the signals that only make the service degraded (200, status
"degraded"): forecast queue depth, projection lag and, once the cache exists, Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from infra.errors import StoreUnavailableError
from infra.eventstore import EventLog
from infra.readstore import ReadStore
from infra.settings import Settings
from service import errors

STATUS_HEADER = "X-Service-Status"
MESSAGE_HEADER = "X-Service-Message"
# Queue depth over this share of forecast_queue_limit degrades the service (in fifths).
_QUEUE_FIFTHS = 4


class Check(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One non-critical check: its value, the threshold over which it degrades."""

    status: Literal["ok", "degraded"]
    value: int | None = None
    threshold: int | None = None
    message: str | None = None


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok", "degraded"]
    checks: dict[str, Check]


class ReadinessProbe:
    """Runs the checks of /health/ready. Readiness is polled often, so each run is a few
    cheap statements, at most one run is in flight (concurrent polls share it, so a hung
    database holds one thread, not one per poll), and every poll answers within
    ``timeout_s``."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        store: ReadStore,
        projections: Sequence[str],
    ) -> None:
        self._log = log
        self._store = store
        self._projections = tuple(projections)
        self._queue_limit = settings.forecast_queue_limit
        self._max_lag = settings.max_projection_lag_events
        self._timeout_s = settings.health_timeout_s
        self._running: asyncio.Future[Readiness] | None = None

    async def readiness(self) -> Readiness:
        """The report; StoreUnavailableError when the database does not answer in time."""
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(None, self.check)
            # A run that outlives its pollers still has its outcome retrieved.
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), self._timeout_s)
        except TimeoutError:
            raise StoreUnavailableError(
                f"the database did not answer within {self._timeout_s:g} s"
            ) from None

    def check(self) -> Readiness:
        """One run of the checks (blocking); StoreUnavailableError when a store fails."""
        head = self._log.position()
        lag = head - min(self._positions(), default=head)
        [row] = self._store.query("queue", "SELECT COUNT(*) AS depth FROM queue_active")
        depth = int(row["depth"])
        queue_threshold = self._queue_limit * _QUEUE_FIFTHS // 5
        checks = {
            "database": Check(status="ok"),
            "forecastQueue": _over(depth, queue_threshold, "forecast queue nearly full"),
            "projectionLag": _over(lag, self._max_lag, "read models lag behind the log"),
            # Redis (the read cache) joins here as a non-critical check when it is built.
        }
        degraded = any(c.status == "degraded" for c in checks.values())
        return Readiness(status="degraded" if degraded else "ok", checks=checks)

    def _positions(self) -> list[int]:
        """Each read model's tracking position (0 before its first batch)."""
        # Table names come from our own projector names, never from a request.
        statements = {
            name: "SELECT COALESCE(MAX(notification_id), 0) AS position"  # noqa: S608
            f" FROM {self._store.tracking_table(name)} WHERE application_name = ?"
            for name in self._projections
        }
        if self._store.postgres:
            # All tracking tables live in the one database: one round trip.
            rows = self._store.query(
                self._projections[0],
                " UNION ALL ".join(statements.values()),
                [EventLog.name] * len(statements),
            )
        else:
            # One file per read model on SQLite.
            rows = [
                row
                for name, sql in statements.items()
                for row in self._store.query(name, sql, [EventLog.name])
            ]
        return [int(row["position"]) for row in rows]


def _over(value: int, threshold: int, message: str) -> Check:
    if value > threshold:
        return Check(status="degraded", value=value, threshold=threshold, message=message)
    return Check(status="ok", value=value, threshold=threshold)


_encoder = msgspec.json.Encoder()


async def live(_: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def ready(request: Request) -> Response:
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
