"""Settings: every service address, limit and timeout, read from the environment once at
the process entry point and passed down. Each default is documented in README.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Services. Without DATABASE_URL the event store is SQLite files under data_dir.
    database_url: str | None = None
    # PostgreSQL only: where API processes read tenants' read models, as a role without
    # BYPASSRLS (see docs/RELIABILITY.md, "Tenancy in depth"). Every such read runs in a
    # transaction scoped to the caller's tenant, and row-level security hides the rows of
    # every other tenant even from a query that forgot its tenant filter. Unset: the
    # API reads as DATABASE_URL's role, which owns the tables and so bypasses the policies.
    read_database_url: str | None = None
    redis_url: str | None = None
    broker_url: str | None = None
    data_dir: str = "./accubooks-data"

    # Requests.
    max_body_bytes: PositiveInt = 1024 * 1024
    # A cached key decision is reused this long: a revoked key stops working on every
    # process within this TTL (the contract says 5 s).
    auth_cache_ttl_s: Annotated[float, msgspec.Meta(ge=0, le=5)] = 2.0
    auth_cache_entries: PositiveInt = 10_000
    # Bounded retries of a command whose aggregate changed under it (no If-Match sent).
    command_attempts: PositiveInt = 20
    # Group commit: concurrent commands of one process share one event-store transaction
    # (one table lock, one WAL flush), at most group_commit_max commands each. Off: one
    # transaction per command, the event-sourcing library's stock path.
    group_commit: bool = True
    group_commit_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 64
    # Signs paging cursors; every API process of a deployment needs the same value.
    # Unset: derived from the store's address (fine embedded, set it in production).
    cursor_secret: str = ""
    # Load shedding: requests in flight per process before new ones get 503 OVERLOADED
    # (health and metrics are never shed).
    max_in_flight: PositiveInt = 64
    # While admitted requests take longer than this on average, the bound above is
    # lowered (to 4 at least) until they do not, and raised back when they are faster
    # (service.shedding.Gate.finished); 0: the bound stays max_in_flight.
    shed_latency_target_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Longest a read sent with X-Consistency-Token waits for the read models to reach it
    # (then 503 OPERATION_TIMEOUT, operation read_your_writes).
    read_your_writes_timeout_s: PositiveSeconds = 2.0
    # After SIGTERM an API process goes on serving this long while /health/ready answers
    # 503 (so load balancers take it out), then stops accepting and finishes the requests
    # in flight. Set it a little over the load balancer's readiness period.
    shutdown_drain_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # API processes log JSON lines from this level on; INFO includes one access line per
    # request, WARNING leaves only problems.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Projections.
    projection_batch_size: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    # The longest a worker sleeps without checking the log. PostgreSQL wakes workers by
    # notification, so this only bounds the delay of a lost one; SQLite has none across
    # processes, so there workers poll.
    projection_wakeup_s: PositiveSeconds = 1.0
    projection_poll_s: PositiveSeconds = 0.05
    # A batch whose projector raises (a bug or an event it cannot handle, not a store
    # failure) is tried this many times, waiting projection_retry_s, doubled each time;
    # then the failing event is found and parked, and the projection goes on without it.
    projection_attempts: PositiveInt = 3
    projection_retry_s: PositiveSeconds = 0.2
    # Parked events one projection may hold before it stops parking and waits instead
    # (a bug that fails every event must block the read model, not hollow it out).
    projection_max_parked: PositiveInt = 100

    # Forecast jobs.
    forecast_queue_limit: PositiveInt = 100
    forecast_tenant_limit: PositiveInt = 20
    # Hard limit of one forecast's computation; over it the forecast fails with TIMEOUT.
    forecast_timeout_s: PositiveSeconds = 30.0
    worker_threads: PositiveInt = 2
    # Longest an idle job worker waits before polling its broker again (Redis).
    worker_idle_poll_s: PositiveSeconds = 0.1
    broker_timeout_s: PositiveSeconds = 5.0
    # Redis broker: how long a message held by a dead worker waits before redelivery.
    broker_heartbeat_timeout_s: PositiveSeconds = 60.0

    # Event store connections.
    db_pool_size: PositiveInt = 5
    db_pool_max_overflow: Annotated[int, msgspec.Meta(ge=0)] = 10
    db_pool_timeout_s: PositiveSeconds = 5.0
    db_lock_timeout_s: PositiveSeconds = 5.0
    # Longest a new read-side connection may take to open (a server that accepts TCP but
    # never answers must not stall the pool's growth and replacements).
    db_connect_timeout_s: Annotated[int, msgspec.Meta(ge=1)] = 5

    # Read-model queries: the server cancels a statement over this (statement_timeout)
    # and the client stops waiting for it; the read answers 503 OPERATION_TIMEOUT.
    db_statement_timeout_s: PositiveSeconds = 5.0

    # Read cache: Redis at REDIS_URL (may evict: give it a maxmemory policy), else an
    # in-process cache when the projections run in the same process (`serve`).
    cache_enabled: bool = True
    cache_prefix: str = "accubooks:"
    cache_ttl_dashboard_s: PositiveSeconds = 300.0
    cache_ttl_forecasts_s: PositiveSeconds = 900.0
    cache_ttl_usage_s: PositiveSeconds = 60.0
    cache_ttl_scenarios_s: PositiveSeconds = 60.0
    # Entries of the in-process cache (least recently used go first).
    cache_local_entries: PositiveInt = 10_000
    # With Redis, each API process also keeps answers it has seen in memory (up to this
    # many bytes of bodies; 0: none), served while its copy of the generations is fresh:
    # subscribed to the bumps' channel and heard from within cache_local_max_lag_s. A
    # bump reaches every process within that bound; past it the memory tier is bypassed.
    cache_local_tier_bytes: Annotated[int, msgspec.Meta(ge=0)] = 32 * 1024 * 1024
    cache_local_max_lag_s: PositiveSeconds = 0.5
    # Budget of one Redis call (connect, send, answer); no retries.
    redis_timeout_s: PositiveSeconds = 1.0
    # Consecutive Redis failures that open the circuit breaker, and how long it stays
    # open before one call tries Redis again.
    redis_breaker_failures: PositiveInt = 3
    redis_breaker_open_s: PositiveSeconds = 2.0

    # Audit: signs checkpoints (base64 of a 32-byte Ed25519 seed; the same on every
    # process). Unset: a key generated once into data_dir (embedded use).
    audit_signing_key: str = ""

    # Readiness (/health/ready). Its database checks share one deadline, so a hung
    # database answers 503 within it instead of holding the poller.
    health_timeout_s: PositiveSeconds = 2.0
    # Events the slowest read model may trail the log by before the service is degraded.
    max_projection_lag_events: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    # How often an API process re-runs those checks in the background, so that every
    # response carries X-Service-Status while the service is degraded.
    status_refresh_s: PositiveSeconds = 2.0


# Environment variable names; the service addresses keep their conventional names.
_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "read_database_url": "READ_DATABASE_URL",
    "redis_url": "REDIS_URL",
    "broker_url": "BROKER_URL",
}


def cursor_key(settings: Settings) -> bytes:
    seed = (
        settings.cursor_secret
        or f"accubooks-cursor:{settings.database_url or os.path.abspath(settings.data_dir)}"
    )
    return hashlib.sha256(seed.encode()).digest()


def env_name(field: str) -> str:
    return _ENV_NAMES.get(field, "ACCUBOOKS_" + field.upper())


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; a malformed value stops the process with its name."""
    source = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for field in Settings.__struct_fields__:
        value = source.get(env_name(field))
        if value not in (None, ""):
            raw[field] = value
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise SystemExit(f"invalid setting: {e}") from e
