"""The API's own Prometheus metrics (GET /metrics), scraped before and after a run: counter
deltas and each route's server-side time from the request-duration histogram."""

from __future__ import annotations

import httpx2 as httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from perf.harness import REQUEST_TIMEOUT_S

# One sample of a Prometheus series: (name, sorted labels) -> value.
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]

REQUEST_DURATION = "accubooks_request_duration_seconds"


class RouteTime(msgspec.Struct, frozen=True, kw_only=True):
    """Server-side time of one route, from the API's own histogram (not the load
    generator's clock)."""

    requests: int
    mean_ms: float
    # Upper bound of the histogram bucket holding the 95th percentile.
    p95_le_ms: float | None


def scrape(url: str) -> Series:
    """Every sample the API at ``url`` exposes now."""
    text = httpx.get(url + "/metrics", timeout=REQUEST_TIMEOUT_S, trust_env=False).text
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return series


def delta(before: Series, after: Series, name: str, **labels: str) -> int:
    """How much the series ``name`` with (at least) ``labels`` grew, summed over the rest
    of their labels."""
    want = set(labels.items())
    return round(
        sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and want <= set(k[1]))
    )


def route_times(before: Series, after: Series) -> dict[str, RouteTime]:
    """Per read route (all methods and statuses together): requests, mean and the p95
    bucket between the two scrapes."""
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for key, value in after.items():
        labels = dict(key[1])
        route, change = labels.get("route", ""), value - before.get(key, 0.0)
        if not route.startswith("/api/"):
            continue
        if key[0] == REQUEST_DURATION + "_count":
            counts[route] = counts.get(route, 0.0) + change
        elif key[0] == REQUEST_DURATION + "_sum":
            sums[route] = sums.get(route, 0.0) + change
        elif key[0] == REQUEST_DURATION + "_bucket":
            per_le = buckets.setdefault(route, {})
            le = float(labels["le"])
            per_le[le] = per_le.get(le, 0.0) + change
    found: dict[str, RouteTime] = {}
    for route, count in sorted(counts.items()):
        if count < 1:
            continue
        cumulative = sorted(buckets.get(route, {}).items())
        p95 = next((le for le, n in cumulative if n >= 0.95 * count), None)
        found[route] = RouteTime(
            requests=round(count),
            mean_ms=round(sums.get(route, 0.0) / count * 1000, 2),
            p95_le_ms=None if p95 is None or p95 == float("inf") else p95 * 1000,
        )
    return found
