"""The read cache, on both event-store backends and both caches (in-process in the
embedded process, Redis for API processes): a change is visible to the next read that
sends its token even though the old answer was cached, a token is never answered from an
entry older than it, a cold hot key costs one database query however many read it at
once, and garbage under a key is a miss that the next read overwrites."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx2
import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from infra.cache import entry_key
from infra.eventstore import EventLog
from infra.settings import Settings
from projections.runner import ProjectionRunner
from readapi.cache import Entry, key_name
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.services import serving, unavailable

SHARED_REDIS = "redis://127.0.0.1:6379/0"
CONSISTENCY = "X-Consistency-Token"
POSITION = "X-Projection-Position"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A private key prefix on the shared Redis, its keys deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        unavailable("Redis", e)
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["in-process", "redis"])
def cached(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The settings with one of the two caches (in-process needs the projections here)."""
    if request.param == "in-process":
        return settings
    prefix = request.getfixturevalue("redis_prefix")
    return msgspec.structs.replace(settings, redis_url=SHARED_REDIS, cache_prefix=prefix)


def read(client: TestClient, key: str, path: str, token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if token is not None:
        headers[CONSISTENCY] = token
    return client.get(path, headers=headers)


def create_scenario(client: TestClient, tenant: Tenant) -> str:
    created = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert created.status_code == 201, created.text
    return created.headers[CONSISTENCY]


def test_a_change_is_visible_to_the_next_read_although_the_old_answer_was_cached(
    cached: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    app = create_app(cached, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        first_token = create_scenario(client, tenant)
        reads = ["/api/dashboard", "/api/scenarios", "/api/usage"]
        before = {path: read(client, tenant.reader, path, first_token) for path in reads}
        again = {path: read(client, tenant.reader, path) for path in reads}
        store = client.app.state.read_api.store  # type: ignore[attr-defined]
        statements: list[str] = []
        store.on_statement = statements.append
        for path in reads:
            # Cached: the same answer, and no statement reached the database.
            assert again[path].content == before[path].content
        assert before["/api/dashboard"].json()["scenarios"]["total"] == 1

        token = create_scenario(client, tenant)
        statements.clear()
        after = {path: read(client, tenant.reader, path, token) for path in reads}
        assert after["/api/dashboard"].json()["scenarios"]["total"] == 2
        assert after["/api/scenarios"].json()["pagination"]["total"] == 2
        assert after["/api/usage"].json()["scenariosCreated"] == 2
        for path in reads:
            assert int(after[path].headers[POSITION]) >= int(token)
        assert statements, "the changed answers came from the database"

        # And once projected, readers without a token see it too (the generation moved).
        assert client.app.state.projections.wait_for(int(token), 10.0)  # type: ignore[attr-defined]
        plain = read(client, tenant.reader, "/api/dashboard")
        assert plain.json()["scenarios"]["total"] == 2


def test_a_token_is_never_answered_from_an_entry_older_than_it(
    settings: Settings, event_log: EventLog, tenant: Tenant, redis_prefix: str
) -> None:
    """An API process on Redis, and projection workers that (here) never invalidate: the
    stale entry is served to plain reads, never to a read whose token it has not reached."""
    with_redis = msgspec.structs.replace(
        settings, redis_url=SHARED_REDIS, cache_prefix=redis_prefix
    )
    silent = ProjectionRunner(with_redis, event_log, wiring.projectors(), wakeup_s=0.05)
    silent.start()
    try:
        with TestClient(create_app(with_redis, event_log=event_log)) as api:
            first = create_scenario(api, tenant)
            assert silent.wait_for(int(first), 10.0)
            assert read(api, tenant.reader, "/api/dashboard").json()["scenarios"]["total"] == 1

            token = create_scenario(api, tenant)
            assert silent.wait_for(int(token), 10.0)
            stale = read(api, tenant.reader, "/api/dashboard")
            assert stale.json()["scenarios"]["total"] == 1, "the entry was served (and is stale)"
            fresh = read(api, tenant.reader, "/api/dashboard", token)
            assert fresh.json()["scenarios"]["total"] == 2
            assert int(fresh.headers[POSITION]) >= int(token)
    finally:
        silent.stop()


async def _many_reads(url: str, key: str, count: int) -> list[httpx2.Response]:
    limits = httpx2.Limits(max_connections=count)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        return await asyncio.gather(
            *(
                http.get("/api/dashboard", headers={"Authorization": f"Bearer {key}"})
                for _ in range(count)
            )
        )


def test_a_cold_hot_key_read_by_200_at_once_costs_one_database_query(
    cached: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    roomy = msgspec.structs.replace(cached, max_in_flight=1000)
    app = create_app(roomy, event_log=event_log, run_projections=True, run_jobs=False)
    with serving(app) as url:
        store = app.state.read_api.store
        statements: list[str] = []
        store.on_statement = statements.append
        responses = asyncio.run(_many_reads(url, tenant.reader, 200))
    assert [r.status_code for r in responses] == [200] * 200
    assert len({r.content for r in responses}) == 1
    # (The background readiness checks query other tables meanwhile.)
    dashboard_reads = [s for s in statements if "dashboard_tenants" in s]
    assert len(dashboard_reads) == 1, dashboard_reads


def test_garbage_under_a_key_is_a_miss_and_is_overwritten(
    settings: Settings, event_log: EventLog, tenant: Tenant, redis_prefix: str
) -> None:
    # Without the memory tier, which would keep answering the good entry it remembers
    # (this is about what Redis holds).
    with_redis = msgspec.structs.replace(
        settings, redis_url=SHARED_REDIS, cache_prefix=redis_prefix, cache_local_tier_bytes=0
    )
    app = create_app(with_redis, event_log=event_log, run_projections=True, run_jobs=False)
    raw = redis.Redis.from_url(SHARED_REDIS)
    key = entry_key(redis_prefix, tenant.tenant_id, "dashboard", key_name("dashboard"))
    try:
        with TestClient(app) as client:
            token = create_scenario(client, tenant)
            good = read(client, tenant.reader, "/api/dashboard", token)
            assert good.status_code == 200
            stored = raw.get(key)
            assert stored is not None, "the answer was cached under the documented key"
            for garbage in (b"\x00not msgpack\xff", b"", msgspec.msgpack.encode([1, "x"])):
                raw.set(key, garbage)
                again = read(client, tenant.reader, "/api/dashboard")
                assert again.status_code == 200
                assert again.content == good.content
                assert "X-Service-Status" not in again.headers
                mended = raw.get(key)
                assert isinstance(mended, bytes)
                assert msgspec.msgpack.decode(mended, type=Entry).body == good.content
    finally:
        raw.close()
