"""The process's Prometheus metrics. Defined here, at the bottom of the layers that count
(infra), so the read API, the cache and the service middleware all count into the same
series. With several API processes, prometheus_client's multi-process mode (the
PROMETHEUS_MULTIPROC_DIR environment variable, set before the process starts) keeps
each process's values in shared files that /metrics adds up."""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

# prometheus_client chooses between in-memory and file-backed values when it is imported,
# from this variable.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

# Read-cache lookups by outcome: hit, miss, error (Redis failed or the breaker is open).
CACHE = Counter("accubooks_cache_requests", "Read-cache lookups by outcome", ["result"])
# Requests answered 503 OVERLOADED by load shedding.
SHED = Counter("accubooks_shed_requests", "Requests shed (503 OVERLOADED)")
# The in-flight bound in force (below ACCUBOOKS_MAX_IN_FLIGHT while requests take longer
# than ACCUBOOKS_SHED_LATENCY_TARGET_MS); one series per live process in multi-process mode.
IN_FLIGHT_LIMIT = Gauge(
    "accubooks_in_flight_limit",
    "Requests admitted in flight before new ones are shed",
    multiprocess_mode="liveall",
)
# Operations over their budget, by operation (503 OPERATION_TIMEOUT, Redis calls).
TIMEOUTS = Counter("accubooks_timeouts", "Operations over their time budget", ["operation"])

# Every HTTP request's duration, by the matched route's path template (never the raw path,
# so ids do not multiply the series), method and status. The target p95 of a read is a few
# milliseconds, so the buckets are fine from 1 ms and stop at 10 s.
REQUEST_DURATION = Histogram(
    "accubooks_request_duration_seconds",
    "HTTP request duration by route template, method and status",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
