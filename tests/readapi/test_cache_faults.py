"""The read cache under real Redis faults (a private redis-server the tests kill and
restart, a TCP proxy that slows, black-holes or garbles its link): every read is still
answered 200 with the right body, marked degraded while the cache fails, never waits more
than the 1 s Redis budget, pays almost nothing once the circuit breaker is open, and
caching resumes by itself when Redis is back."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx2
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.settings import Settings
from readapi.cache import ReadCache
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.faults import PrivateRedis, TcpProxy, private_redis

STATUS = "X-Service-Status"
MESSAGE = "X-Service-Message"
CONSISTENCY = "X-Consistency-Token"
# Redis's budget per call (the setting's default, which these tests are about) and what a
# read may add to it for its own database query.
REDIS_BUDGET_S = 1.0
DATABASE_MARGIN_S = 0.5
# Short enough to keep the tests quick, long enough that a few fast reads fit inside it.
BREAKER_OPEN_S = 0.5
# A read that neither waits for Redis nor for a lock answers well within this.
FAST_READ_S = 0.25
PROJECTED_S = 10.0
ADDED_LATENCY_MAX_S = 0.050
SAMPLES = 30


@pytest.fixture
def private() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@dataclass(frozen=True)
class Reads:
    """Every read route of one tenant, and the answers they gave with a healthy cache."""

    client: TestClient
    tenant: Tenant
    paths: tuple[str, ...]
    good: dict[str, bytes]

    @property
    def cache(self) -> ReadCache:
        cache: ReadCache = self.client.app.state.read_api.cache  # type: ignore[attr-defined]
        return cache

    def get(self, path: str) -> httpx2.Response:
        return self.client.get(path, headers={"Authorization": f"Bearer {self.tenant.reader}"})

    def timed(self, path: str) -> tuple[httpx2.Response, float]:
        started = time.monotonic()
        response = self.get(path)
        return response, time.monotonic() - started

    def assert_served(self, path: str, response: httpx2.Response) -> None:
        assert response.status_code == 200, (path, response.status_code, response.text)
        assert response.content == self.good[path], path


def settings_on(settings: Settings, redis_url: str, **overrides: object) -> Settings:
    """The settings with a private Redis as the cache, under a prefix of this test's own;
    without the memory tier (these are Redis's faults; the tier's own are in
    test_memory_tier.py), unless overridden."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    changed = msgspec.structs.replace(
        settings, redis_url=redis_url, cache_prefix=prefix, cache_local_tier_bytes=0
    )
    return msgspec.structs.replace(changed, **overrides)


def embedded(settings: Settings, event_log: EventLog) -> Starlette:
    return create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)


def warm(client: TestClient, tenant: Tenant) -> Reads:
    """A scenario and its (queued) forecast, projected; every read route read twice, the
    second time from the cache."""
    created = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert created.status_code == 201, created.text
    scenario_id = created.json()["id"]
    requested = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, "horizonMonths": 12, "paths": 100},
        headers=command_headers(tenant.writer),
    )
    assert requested.status_code == 202, requested.text
    forecast_id = requested.json()["forecastId"]
    runner = client.app.state.projections  # type: ignore[attr-defined]
    assert runner.wait_for(int(requested.headers[CONSISTENCY]), PROJECTED_S)
    paths = (
        "/api/scenarios",
        f"/api/scenarios/{scenario_id}",
        "/api/forecasts",
        f"/api/forecasts/{forecast_id}",
        "/api/dashboard",
        "/api/usage",
    )
    reads = Reads(client=client, tenant=tenant, paths=paths, good={})
    for path in paths:
        first = reads.get(path)
        assert first.status_code == 200, (path, first.text)
        reads.good[path] = first.content
    forecast = msgspec.json.decode(reads.good[f"/api/forecasts/{forecast_id}"])
    assert forecast["id"] == forecast_id and forecast["status"] == "queued", forecast
    counts = msgspec.json.decode(reads.good["/api/dashboard"])
    assert counts["scenarios"]["total"] == counts["forecasts"]["queued"] == 1, counts
    with counted_statements(client) as statements:
        for path in paths:
            again = reads.get(path)
            reads.assert_served(path, again)
            assert STATUS not in again.headers, (path, again.headers)
            assert not statements(path), f"{path} was not served from the cache"
    return reads


# Which read-model table each route's statement reads (the background readiness checks
# run statements of their own meanwhile, on other tables).
def table_of(path: str) -> str:
    if path.startswith("/api/scenarios"):
        return "scenarios_rows"
    if path.startswith("/api/forecasts"):
        return "forecasts_rows"
    if path == "/api/dashboard":
        return "dashboard_tenants"
    assert path == "/api/usage", path
    return "usage_months"


@contextmanager
def counted_statements(client: TestClient) -> Iterator[Callable[[str], list[str]]]:
    """The statements the read store sends, by route, while the block runs."""
    store = client.app.state.read_api.store  # type: ignore[attr-defined]
    sent: list[str] = []
    store.on_statement = sent.append
    try:
        yield lambda path: [s for s in sent if table_of(path) in s]
    finally:
        store.on_statement = None


def assert_degraded(path: str, response: httpx2.Response) -> None:
    assert response.headers.get(STATUS) == "degraded", (path, response.headers)
    assert response.headers.get(MESSAGE), (path, response.headers)


def wait_until_cached_again(reads: Reads, deadline_s: float) -> float:
    """Reads until an answer is no longer degraded; how long that took."""
    started = time.monotonic()
    while True:
        response = reads.get("/api/dashboard")
        reads.assert_served("/api/dashboard", response)
        if STATUS not in response.headers:
            return time.monotonic() - started
        took = time.monotonic() - started
        assert took < deadline_s, f"still degraded {took:.2f} s after the cache came back"
        time.sleep(0.02)


def assert_caching(reads: Reads) -> None:
    """Every route answers right, undegraded, and its second read costs no statement."""
    for path in reads.paths:
        reads.assert_served(path, reads.get(path))
    with counted_statements(reads.client) as statements:
        for path in reads.paths:
            response = reads.get(path)
            reads.assert_served(path, response)
            assert STATUS not in response.headers, (path, response.headers)
            assert not statements(path), f"{path} reached the database: caching did not resume"


def test_with_redis_killed_reads_are_served_degraded_at_almost_no_cost_and_caching_resumes(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis
) -> None:
    cached = settings_on(settings, private.url, redis_breaker_open_s=BREAKER_OPEN_S)
    assert cached.redis_timeout_s == REDIS_BUDGET_S
    # The same read models with no cache at all: the baseline the breaker is measured on.
    uncached = msgspec.structs.replace(settings, cache_enabled=False)
    baseline_app = create_app(uncached, event_log=event_log, run_projections=False)
    with TestClient(embedded(cached, event_log)) as client, TestClient(baseline_app) as baseline:
        reads = warm(client, tenant)
        private.stop()

        # Every read: 200, the same body, marked degraded (the first ones open the breaker).
        for path in reads.paths:
            response = reads.get(path)
            reads.assert_served(path, response)
            assert_degraded(path, response)
        assert reads.cache.unavailable, "the breaker opened after the failures"

        # Readiness: still ready, degraded by the cache.
        ready = client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["cache"]["status"] == "degraded"
        assert ready.headers.get(STATUS) == "degraded"

        # The breaker's cost: the same reads against no cache at all, interleaved.
        headers = {"Authorization": f"Bearer {tenant.reader}"}
        with_breaker: list[float] = []
        without_cache: list[float] = []
        for i in range(SAMPLES):
            path = reads.paths[i % len(reads.paths)]
            started = time.monotonic()
            plain = baseline.get(path, headers=headers)
            without_cache.append(time.monotonic() - started)
            assert plain.content == reads.good[path], path
            response, took = reads.timed(path)
            with_breaker.append(took)
            reads.assert_served(path, response)
            assert_degraded(path, response)
        assert reads.cache.unavailable
        added = statistics.median(with_breaker) - statistics.median(without_cache)
        print(
            f"median read: breaker open {statistics.median(with_breaker) * 1000:.2f} ms,"
            f" no cache {statistics.median(without_cache) * 1000:.2f} ms,"
            f" added {added * 1000:.2f} ms"
        )
        assert added < ADDED_LATENCY_MAX_S, (with_breaker, without_cache)

        # Redis back on its port: caching resumes within the breaker's open time, no restart.
        private.start()
        took = wait_until_cached_again(reads, BREAKER_OPEN_S + 1.0)
        print(f"caching resumed {took * 1000:.0f} ms after Redis answered again")
        assert_caching(reads)
        ready = client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["cache"]["status"] == "ok"


def slowed(proxy: TcpProxy, fault: str) -> None:
    if fault == "delay":
        proxy.delay(3.0)
    else:
        proxy.blackhole()


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fault", ["delay", "blackhole"])
def test_a_slow_or_silent_redis_costs_a_read_at_most_its_budget_then_nothing(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis, fault: str
) -> None:
    with TcpProxy("127.0.0.1", private.port) as proxy:
        cached = settings_on(
            settings,
            proxy.url_for(private.url),
            # Long enough for the fast reads below to fall inside it, trials included.
            redis_breaker_open_s=1.0,
            # The background readiness run pings Redis too: kept out of the count here, so
            # that exactly the first reads open the breaker.
            status_refresh_s=60.0,
        )
        with TestClient(embedded(cached, event_log)) as client:
            reads = warm(client, tenant)
            slowed(proxy, fault)

            slow: list[float] = []
            for path in reads.paths:
                response, took = reads.timed(path)
                reads.assert_served(path, response)
                assert_degraded(path, response)
                assert took < REDIS_BUDGET_S + DATABASE_MARGIN_S, (path, took)
                slow.append(took)
                if reads.cache.unavailable:
                    break
            assert reads.cache.unavailable, "the breaker opened"
            assert len(slow) == cached.redis_breaker_failures, slow
            # Each of them waited for Redis, and only for its budget.
            assert min(slow) >= REDIS_BUDGET_S * 0.9, slow

            fast: list[float] = []
            for path in reads.paths * 2:
                response, took = reads.timed(path)
                reads.assert_served(path, response)
                assert_degraded(path, response)
                fast.append(took)
            assert max(fast) < FAST_READ_S, fast
            print(
                f"{fault}: reads before the breaker opened {[round(s, 3) for s in slow]} s,"
                f" after: max {max(fast) * 1000:.1f} ms"
            )

            proxy.forward()
            took = wait_until_cached_again(reads, 1.0 + REDIS_BUDGET_S + 1.0)
            print(f"{fault}: caching resumed {took * 1000:.0f} ms after the link healed")
            assert_caching(reads)


GARBAGE = {
    "not-resp": b"\x00\xffthis is not RESP\r\n",
    "simple-string": b"+OK\r\n",
    "integer": b":42\r\n",
    "nil": b"$-1\r\n",
    "error": b"-ERR garbage\r\n",
    "array-of-junk": b"*2\r\n$3\r\nabc\r\n$3\r\nxyz\r\n",
}


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_a_redis_answering_garbage_never_changes_an_answer(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis, garbage: str
) -> None:
    with TcpProxy("127.0.0.1", private.port) as proxy:
        cached = settings_on(
            settings, proxy.url_for(private.url), redis_breaker_open_s=BREAKER_OPEN_S
        )
        app = embedded(cached, event_log)
        with TestClient(app, raise_server_exceptions=False) as client:
            reads = warm(client, tenant)
            proxy.garbage(GARBAGE[garbage])
            for path in reads.paths * 2:
                response, took = reads.timed(path)
                reads.assert_served(path, response)
                assert took < REDIS_BUDGET_S + DATABASE_MARGIN_S, (path, took)

            proxy.forward()
            wait_until_cached_again(reads, BREAKER_OPEN_S + REDIS_BUDGET_S + 1.0)
            assert_caching(reads)
