"""Concurrent commands against a real uvicorn server, on both event-store backends: one
idempotency key is executed once, If-Match lets exactly one writer win, and writers
without If-Match never lose an update."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx2
import pytest
from eventsourcing.persistence import Notification

from domain.scenario import Scenario
from infra.eventstore import EventLog
from infra.settings import Settings
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.services import serving

T = TypeVar("T")

# Every wait in this module is bounded: a hung server or a deadlocked store fails the
# test instead of hanging the suite.
DEADLINE_S = 30.0
REQUEST_TIMEOUT_S = 20.0


@pytest.fixture
def base_url(settings: Settings, event_log: EventLog) -> Iterator[str]:
    """A real uvicorn server with default settings on a free port, sharing the test's
    event log, so requests run truly in parallel (own connections, the server's pool)."""
    with serving(create_app(settings, event_log=event_log)) as url:
        yield url


def all_at_once(count: int, call: Callable[[int], T]) -> list[T]:
    """Runs ``call(0..count-1)`` on ``count`` threads released together by a barrier."""
    barrier = threading.Barrier(count, timeout=DEADLINE_S)

    def released(index: int) -> T:
        barrier.wait()
        return call(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(released, index) for index in range(count)]
        return [future.result(timeout=DEADLINE_S) for future in futures]


def send(
    base_url: str, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx2.Response:
    # One client per request: its own connection, as independent clients would have.
    with httpx2.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        return client.request(method, path, json=body, headers=headers)


def notifications_since(event_log: EventLog, position: int) -> Sequence[Notification]:
    return event_log.recorder.select_notifications(start=position + 1, limit=10_000)


def topics_since(event_log: EventLog, position: int) -> Counter[str]:
    return Counter(notification.topic for notification in notifications_since(event_log, position))


def versions_of(event_log: EventLog, aggregate_id: uuid.UUID) -> list[int]:
    """The versions the log holds for one aggregate, in log order."""
    notifications = notifications_since(event_log, 0)
    return [n.originator_version for n in notifications if n.originator_id == aggregate_id]


def create_scenario(base_url: str, tenant: Tenant) -> dict[str, Any]:
    response = send(
        base_url, "POST", "/api/scenarios", scenario_body(), command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_sixteen_simultaneous_requests_with_one_key_create_one_scenario(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    headers = command_headers(tenant.writer, f"burst-{uuid.uuid4().hex}")
    position = event_log.position()

    responses = all_at_once(
        16, lambda _: send(base_url, "POST", "/api/scenarios", scenario_body(), headers)
    )

    assert [r.status_code for r in responses] == [201] * 16, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 15
    # Exactly two events (positions may skip: PostgreSQL spends ids on refused saves).
    assert topics_since(event_log, position) == Counter(
        {"accubooks:Scenario.Created": 1, "accubooks:CommandReceipt.Recorded": 1}
    )


def test_simultaneous_requests_with_one_key_and_other_bodies_are_refused_but_one(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    headers = command_headers(tenant.writer, f"contested-{uuid.uuid4().hex}")
    position = event_log.position()

    responses = all_at_once(
        8,
        lambda index: send(
            base_url, "POST", "/api/scenarios", scenario_body(name=f"Plan {index}"), headers
        ),
    )

    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({201: 1, 422: 7}), [r.text for r in responses]
    refused = [r.json()["error"]["code"] for r in responses if r.status_code == 422]
    assert refused == ["IDEMPOTENCY_KEY_REUSED"] * 7
    assert len(notifications_since(event_log, position)) == 2


def test_simultaneous_patches_with_one_if_match_let_exactly_one_win(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    created = create_scenario(base_url, tenant)
    scenario_id = uuid.UUID(created["id"])
    path = f"/api/scenarios/{scenario_id}"

    responses = all_at_once(
        8,
        lambda index: send(
            base_url,
            "PATCH",
            path,
            {"name": f"Plan {index}"},
            {**command_headers(tenant.writer), "If-Match": '"1"'},
        ),
    )

    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({200: 1, 409: 7}), [r.text for r in responses]
    conflicts = [r.json()["error"]["code"] for r in responses if r.status_code == 409]
    assert conflicts == ["VERSION_CONFLICT"] * 7
    [winner] = [r for r in responses if r.status_code == 200]
    assert winner.json()["version"] == 2
    assert versions_of(event_log, scenario_id) == [1, 2]
    stored = event_log.find(scenario_id, Scenario)
    assert stored is not None
    assert stored.version == 2
    assert stored.name == winner.json()["name"]


def patch_all_at_once(
    base_url: str, tenant: Tenant, path: str, count: int
) -> list[httpx2.Response]:
    """``count`` writers rename one scenario at once, each with its own key and no
    If-Match; every name is new, so every accepted rename adds exactly one version."""
    return all_at_once(
        count,
        lambda _: send(
            base_url,
            "PATCH",
            path,
            {"name": f"Plan {uuid.uuid4().hex[:8]}"},
            command_headers(tenant.writer),
        ),
    )


def test_simultaneous_patches_without_if_match_lose_no_update(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    created = create_scenario(base_url, tenant)
    scenario_id = uuid.UUID(created["id"])
    path = f"/api/scenarios/{scenario_id}"

    responses = patch_all_at_once(base_url, tenant, path, 8)

    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 10))
    assert versions_of(event_log, scenario_id) == list(range(1, 10))
    final = send(base_url, "PATCH", path, {}, command_headers(tenant.writer))
    assert final.status_code == 200, final.text
    assert final.json()["version"] == 1 + 8
    stored = event_log.find(scenario_id, Scenario)
    assert stored is not None
    assert stored.version == 1 + 8


def test_sixteen_simultaneous_writers_without_if_match_all_succeed(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    # Each lost attempt of a writer is another writer's commit, so N writers need at most
    # N attempts: with the former default of 5, this answered 409 IDEMPOTENCY_KEY_IN_USE
    # to writers that had their own keys. A few bursts, so that luck cannot hide it.
    created = create_scenario(base_url, tenant)
    scenario_id = uuid.UUID(created["id"])
    path = f"/api/scenarios/{scenario_id}"

    for burst in range(3):
        responses = patch_all_at_once(base_url, tenant, path, 16)

        refused = [r.json()["error"]["code"] for r in responses if r.status_code != 200]
        assert refused == [], f"burst {burst}: {Counter(refused)}"
    assert versions_of(event_log, scenario_id) == list(range(1, 2 + 3 * 16))
