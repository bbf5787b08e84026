"""GET /metrics (Prometheus text format) and the timing of every request.

Counters and histograms are counted by each process into prometheus_client's series
(infra.metrics). With PROMETHEUS_MULTIPROC_DIR set before the process starts, each process
keeps its values in files there and a scrape of any process adds up all of them. The
database gauges (projection lag, parked events, queue depth) are measured by the scraping
process at scrape time instead, so they are right in both modes and never summed over
processes (a parked event is recorded by a projection process, and scraped from any API).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

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

# In-memory or file-backed values (infra.metrics); the exposition follows the same choice.
MULTIPROCESS = metrics.MULTIPROCESS
# The route label of a request no route matched (404s, shed requests to unknown paths),
# so that arbitrary paths never become series.
UNMATCHED = "unmatched"
# Methods outside this set are counted as "other": a client cannot mint series either.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# Templates of paths matched outside the router, by path: every request shed before the
# app needs one. Bounded (paths hold ids, so under load most lookups miss).
_matched: dict[str, str] = {}
_MATCHED_MAX = 4096
# One regex for all of an app's routes, by the routes' list: a miss costs one match
# instead of a regex per route (11 us of a shed request's 30 with the 19 routes we have).
_matchers: dict[int, tuple[Sequence[BaseRoute], Callable[[str], str | None] | None]] = {}
_MATCHERS_MAX = 8


def _combined(routes: Sequence[BaseRoute]) -> Callable[[str], str | None] | None:
    """A function from a path to the template of the first route whose path pattern matches
    it, as Starlette's own matching finds it (the method aside); None when a route has no
    plain path pattern (then each route matches for itself)."""
    alternatives, templates = [], {}
    for i, route in enumerate(routes):
        regex: re.Pattern[str] | None = getattr(route, "path_regex", None)
        template = getattr(route, "path", None)
        if regex is None or not isinstance(template, str):
            return None
        body = regex.pattern.removeprefix("^").removesuffix("$")
        # The routes' own groups would clash by name across alternatives: uncaptured.
        body = re.sub(r"\(\?P<\w+>", "(?:", body)
        alternatives.append(f"(?P<r{i}>{body})")
        templates[f"r{i}"] = template
    match = re.compile("^(?:" + "|".join(alternatives) + ")$").match

    def template_of(path: str) -> str | None:
        found = match(path)
        return templates[found.lastgroup] if found and found.lastgroup else None

    return template_of


def route_template(scope: Scope, routes: Sequence[BaseRoute] | None = None) -> str:
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
        template = _template(scope, routes)
        if len(_matched) >= _MATCHED_MAX:
            _matched.clear()
        _matched[path] = template
    return template


def _template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    known = _matchers.get(id(routes))
    if known is None or known[0] is not routes:
        if len(_matchers) >= _MATCHERS_MAX:
            _matchers.clear()  # apps come and go in tests; a process serves one
        known = (routes, _combined(routes))
        _matchers[id(routes)] = known
    template_of = known[1]
    if template_of is not None and not scope.get("root_path"):
        return template_of(scope["path"]) or UNMATCHED
    found = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return str(getattr(found, "path", UNMATCHED))


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
