"""GET /metrics (Prometheus text format) and the timing of every request.

Counters and histograms are counted by each process into prometheus_client's series
(infra.metrics). With PROMETHEUS_MULTIPROC_DIR set before the process starts, each process
keeps its values in files there and a scrape of any process adds up all of them. The
database gauges (projection lag, parked events, queue depth) are measured by the scraping
process at scrape time instead, so they are right in both modes and never summed over
processes (a parked event is recorded by a projection process, and scraped from any API).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from infra import metrics
from infra.clock import utc_now
from infra.errors import StoreUnavailableError
from service.health import Progress, ReadinessProbe

# prometheus_client chooses between in-memory and file-backed values when it is imported,
# from this variable; the exposition follows the same choice.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
# The route label of a request no route matched (404s, shed requests to unknown paths),
# so that arbitrary paths never become series.
UNMATCHED = "unmatched"
# Methods outside this set are counted as "other": a client cannot mint series either.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# Templates of paths matched outside the router, by path: every request shed before the
# app needs one, and matching costs a regex per route. Bounded (paths hold ids).
_matched: dict[str, str] = {}
_MATCHED_MAX = 4096


def route_template(scope: Scope, routes: Iterable[BaseRoute] | None = None) -> str:
    """The path template of the route that handled (or would handle) the request;
    ``routes``: the app's, for a request its router never saw."""
    # Starlette's router records the route it dispatched to in the scope.
    route: BaseRoute | None = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", UNMATCHED))
    # Not dispatched (shed before the router, or no route at all): match here.
    path: str = scope["path"]
    template = _matched.get(path)
    if template is None:
        if routes is None:
            app = scope.get("app")
            routes = getattr(getattr(app, "router", None), "routes", ())
        found = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
        template = str(getattr(found, "path", UNMATCHED))
        if len(_matched) >= _MATCHED_MAX:
            _matched.clear()
        _matched[path] = template
    return template


def method_label(scope: Scope) -> str:
    method: str = scope["method"]
    return method if method in _METHODS else "other"


# The histogram's children by (route, method, status): labels() takes a lock and builds
# its key on every call; the set of keys is bounded (templates, methods, statuses).
_durations: dict[tuple[str, str, int], Histogram] = {}


def observe(route: str, method: str, status: int, duration_s: float) -> None:
    """Observes one HTTP request's duration, from its start until the app has sent its
    last byte, into the histogram by route template, method and status."""
    child = _durations.get((route, method, status))
    if child is None:
        child = metrics.REQUEST_DURATION.labels(route, method, str(status))
        _durations[route, method, status] = child
    child.observe(duration_s)


class StoreGauges:
    """The database gauges of one scrape, from the progress the scraping process measured;
    when the database did not answer, only ``accubooks_database_up 0``."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def collect(self) -> Iterator[Metric]:
        progress = self._progress
        yield GaugeMetricFamily(
            "accubooks_database_up",
            "1 when the database answered this scrape's queries in time, else 0",
            value=int(progress is not None),
        )
        if progress is None:
            return
        yield GaugeMetricFamily(
            "accubooks_event_log_position", "The newest position of the event log", progress.head
        )
        events = GaugeMetricFamily(
            "accubooks_projection_lag_events",
            "Events in the log that the projection has not applied yet",
            labels=["projection"],
        )
        seconds = GaugeMetricFamily(
            "accubooks_projection_lag_seconds",
            "Age of the oldest event the projection has not applied yet (0 when caught up)",
            labels=["projection"],
        )
        now = utc_now()
        for name, position in sorted(progress.positions.items()):
            events.add_metric([name], max(0, progress.head - position))
            since = progress.behind_since.get(name)
            # Clocks of other processes may run a little ahead of ours: never below 0.
            age_s = max(0.0, (now - since).total_seconds()) if since is not None else 0.0
            seconds.add_metric([name], age_s)
        yield events
        yield seconds
        parked = GaugeMetricFamily(
            "accubooks_projection_parked_events",
            "Events the projection skipped because its projector kept failing on them",
            labels=["projection"],
        )
        for name, count in sorted(progress.parked.items()):
            parked.add_metric([name], count)
        yield parked
        yield GaugeMetricFamily(
            "accubooks_forecast_queue_depth",
            "Forecasts queued or running, all tenants",
            progress.queue_depth,
        )


def exposition(progress: Progress | None) -> bytes:
    """Every series of the process (or, in multi-process mode, of all processes) plus the
    database gauges, in the Prometheus text format."""
    registry = CollectorRegistry()
    if MULTIPROCESS:
        # Registers itself; prometheus_client leaves its constructor unannotated.
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        # The default registry is itself a collector; nesting it keeps it untouched.
        registry.register(REGISTRY)
    registry.register(StoreGauges(progress))
    return generate_latest(registry)


async def get_metrics(request: Request) -> Response:
    probe: ReadinessProbe = request.state.readiness
    try:
        # Bounded by the health timeout; a database that is down costs the scrape its
        # database gauges, never its answer.
        progress: Progress | None = await probe.measure()
    except StoreUnavailableError:
        progress = None
    # Reading the multi-process files is file I/O: off the event loop.
    body = await run_in_threadpool(exposition, progress)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


route = Route("/metrics", get_metrics, methods=["GET"])
