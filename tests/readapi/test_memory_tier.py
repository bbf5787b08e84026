"""The read cache's memory tier (each API process's copy of the answers it has seen, trusted
while its subscription to the bumps' channel is fresh), with real Redis and real
projection workers in their own runner, as in a deployment: a change reaches the next
read in every API process (at once with its token, within the feed's bound without), and
losing the subscription, cleanly or silently, never serves an answer a bump has made
stale."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx2
import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.settings import Settings
from projections.runner import ProjectionRunner
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.faults import PrivateRedis, TcpProxy, private_redis

CONSISTENCY = "X-Consistency-Token"
STATUS = "X-Service-Status"
PROJECTED_S = 10.0
MAX_LAG_S = 0.5
# A bump reaches every process within the feed's bound; this adds the test's own reads.
VISIBLE_S = MAX_LAG_S + 1.0
POLL_S = 0.02


@pytest.fixture
def private() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


def on_redis(settings: Settings, url: str) -> Settings:
    return msgspec.structs.replace(
        settings,
        redis_url=url,
        cache_prefix=f"test-{uuid.uuid4().hex[:12]}:",
        cache_local_max_lag_s=MAX_LAG_S,
    )


@contextmanager
def projecting(settings: Settings, event_log: EventLog) -> Iterator[ProjectionRunner]:
    """The projection workers of a separate process: they invalidate through Redis."""
    runner = wiring.projection_runner(settings, event_log)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def read(client: TestClient, tenant: Tenant, token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {tenant.reader}"}
    if token is not None:
        headers[CONSISTENCY] = token
    response = client.get("/api/dashboard", headers=headers)
    assert response.status_code == 200, response.text
    return response


def total(response: httpx2.Response) -> int:
    found: int = response.json()["scenarios"]["total"]
    return found


def create_scenario(client: TestClient, tenant: Tenant) -> str:
    created = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert created.status_code == 201, created.text
    token: str = created.headers[CONSISTENCY]
    return token


def memory_hits(client: TestClient) -> int:
    """Reads answered from memory so far (the process's counter: in one test process,
    every app counts into it)."""
    text = client.get("/metrics").text
    for row in text.splitlines():
        if row.startswith('accubooks_cache_requests_total{result="memory"}'):
            return int(float(row.split()[-1]))
    return 0


def wait_fed(client: TestClient) -> None:
    """Until the app's feed has subscribed (its lifespan starts it)."""
    feed = client.app.state.read_api.cache.feed  # type: ignore[attr-defined]
    deadline = time.monotonic() + PROJECTED_S
    while feed.epoch() is None:
        assert time.monotonic() < deadline, "the generation feed never subscribed"
        time.sleep(POLL_S)


def warmed(client: TestClient, tenant: Tenant, expected: int) -> None:
    """Reads until the answer is served from memory, and checks it says ``expected``."""
    deadline = time.monotonic() + PROJECTED_S
    while True:
        before = memory_hits(client)
        assert total(read(client, tenant)) == expected
        if memory_hits(client) > before:
            return
        assert time.monotonic() < deadline, "the answer never came from memory"


def eventually_total(client: TestClient, tenant: Tenant, expected: int, within_s: float) -> float:
    started = time.monotonic()
    while (found := total(read(client, tenant))) != expected:
        took = time.monotonic() - started
        assert took < within_s, f"still {found} (not {expected}) after {took:.2f} s"
        time.sleep(POLL_S)
    return time.monotonic() - started


def test_a_change_reaches_the_next_read_in_every_api_process(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis
) -> None:
    deployed = on_redis(settings, private.url)
    with ExitStack() as stack:
        runner = stack.enter_context(projecting(deployed, event_log))
        apis = [
            stack.enter_context(TestClient(create_app(deployed, event_log=event_log)))
            for _ in range(2)
        ]
        first = create_scenario(apis[0], tenant)
        assert runner.wait_for(int(first), PROJECTED_S)
        for api in apis:
            wait_fed(api)
            warmed(api, tenant, 1)

        token = create_scenario(apis[1], tenant)
        # With its token, the very next read in each process (both remember total 1).
        for api in apis:
            fresh = read(api, tenant, token)
            assert total(fresh) == 2
            assert int(fresh.headers["X-Projection-Position"]) >= int(token)
        # Without one, once projected: within the feed's bound in each process.
        assert runner.wait_for(int(token), PROJECTED_S)
        for api in apis:
            eventually_total(api, tenant, 2, VISIBLE_S)
            warmed(api, tenant, 2)


def test_the_bump_alone_reaches_a_process_that_never_sent_the_token(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis
) -> None:
    # No read with a token refreshes the memory here: only the announcement can. (Clock-
    # sized generations once printed as floats in it and were lost.)
    deployed = on_redis(settings, private.url)
    with ExitStack() as stack:
        runner = stack.enter_context(projecting(deployed, event_log))
        reader_api = stack.enter_context(TestClient(create_app(deployed, event_log=event_log)))
        writer_api = stack.enter_context(TestClient(create_app(deployed, event_log=event_log)))
        first = create_scenario(writer_api, tenant)
        assert runner.wait_for(int(first), PROJECTED_S)
        wait_fed(reader_api)
        warmed(reader_api, tenant, 1)

        token = create_scenario(writer_api, tenant)
        assert runner.wait_for(int(token), PROJECTED_S)
        eventually_total(reader_api, tenant, 2, VISIBLE_S)


def test_a_closed_bump_channel_never_serves_an_answer_a_bump_made_stale(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis
) -> None:
    deployed = on_redis(settings, private.url)
    admin = redis.Redis.from_url(private.url, socket_timeout=2)
    with (
        projecting(deployed, event_log) as runner,
        TestClient(create_app(deployed, event_log=event_log)) as api,
    ):
        first = create_scenario(api, tenant)
        assert runner.wait_for(int(first), PROJECTED_S)
        wait_fed(api)
        warmed(api, tenant, 1)

        # The subscription goes (a Redis restart or failover does this); the bump that
        # follows is announced to nobody.
        assert admin.client_kill_filter(_type="pubsub") >= 1
        token = create_scenario(api, tenant)
        assert runner.wait_for(int(token), PROJECTED_S)
        # Read at once: the lost subscription was noticed and the memory tier bypassed.
        assert total(read(api, tenant)) == 2
        # And it resubscribes: answers come from memory again.
        wait_fed(api)
        warmed(api, tenant, 2)
    admin.close()


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_a_silent_bump_channel_stops_the_memory_tier_within_its_bound(
    settings: Settings, event_log: EventLog, tenant: Tenant, private: PrivateRedis
) -> None:
    """The API reaches Redis through a link that then goes silent (no reset, nothing
    answered); the projection workers still reach Redis directly and bump. Within the
    feed's bound no read is served the stale answer (it is served from the database,
    marked degraded, since Redis is unreachable from the API)."""
    direct = on_redis(settings, private.url)
    with TcpProxy("127.0.0.1", private.port) as proxy:
        through = msgspec.structs.replace(direct, redis_url=proxy.url_for(private.url))
        with (
            projecting(direct, event_log) as runner,
            TestClient(create_app(through, event_log=event_log)) as api,
        ):
            first = create_scenario(api, tenant)
            assert runner.wait_for(int(first), PROJECTED_S)
            wait_fed(api)
            warmed(api, tenant, 1)

            proxy.blackhole()
            token = create_scenario(api, tenant)
            assert runner.wait_for(int(token), PROJECTED_S)
            time.sleep(MAX_LAG_S)
            after = read(api, tenant)
            assert total(after) == 2
            assert after.headers.get(STATUS) == "degraded"
