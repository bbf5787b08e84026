"""Group commit under concurrency, on both event-store backends: 32 commands arriving at
once share transactions, yet each gets exactly the answer it would get alone (the one the
stock path, also run here, gives), and nothing acknowledged is lost or doubled when a
shared transaction is refused."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from domain.receipt import CommandReceipt
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from service.app import create_app
from tests.commands.test_concurrency import (
    all_at_once,
    create_scenario,
    notifications_since,
    send,
    topics_since,
    versions_of,
)
from tests.conftest import Tenant, command_headers, scenario_body
from tests.services import serving

CLIENTS = 32
CREATED = "accubooks:Scenario.Created"
RECEIPT = "accubooks:CommandReceipt.Recorded"


@pytest.fixture(params=["group", "stock"])
def base_url(request: pytest.FixtureRequest, settings: Settings) -> Iterator[str]:
    """A real server with its own event log on the test's store: with group commit (the
    default) and without it (one transaction per command), which must answer alike."""
    grouped = msgspec.structs.replace(settings, group_commit=request.param == "group")
    log = open_event_log(grouped)
    assert log.groups_commits == (request.param == "group")
    try:
        with serving(create_app(grouped, event_log=log)) as url:
            yield url
    finally:
        log.close()


def receipts_since(event_log: EventLog, position: int) -> list[CommandReceipt]:
    found = []
    for notification in notifications_since(event_log, position):
        if notification.topic == RECEIPT:
            receipt = event_log.find(uuid.UUID(str(notification.originator_id)), CommandReceipt)
            assert receipt is not None
            found.append(receipt)
    return found


def created_ids_since(event_log: EventLog, position: int) -> list[uuid.UUID]:
    return [
        uuid.UUID(str(n.originator_id))
        for n in notifications_since(event_log, position)
        if n.topic == CREATED
    ]


def test_thirty_two_simultaneous_commands_are_all_acknowledged_with_exactly_their_events(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    position = event_log.position()

    responses = all_at_once(
        CLIENTS,
        lambda index: send(
            base_url,
            "POST",
            "/api/scenarios",
            scenario_body(name=f"Plan {index}"),
            command_headers(tenant.writer),
        ),
    )

    assert [r.status_code for r in responses] == [201] * CLIENTS, [r.text for r in responses]
    acknowledged = {uuid.UUID(r.json()["id"]) for r in responses}
    assert len(acknowledged) == CLIENTS
    assert sorted(created_ids_since(event_log, position)) == sorted(acknowledged)
    assert topics_since(event_log, position) == Counter({CREATED: CLIENTS, RECEIPT: CLIENTS})
    # Each answer's consistency token is at or past its own events.
    for response in responses:
        token = int(response.headers["X-Consistency-Token"])
        [own] = [
            n
            for n in notifications_since(event_log, position)
            if n.originator_id == uuid.UUID(response.json()["id"])
        ]
        assert token >= own.id


def test_thirty_two_simultaneous_requests_with_one_key_store_one_answer(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    headers = command_headers(tenant.writer, f"group-{uuid.uuid4().hex}")
    position = event_log.position()

    responses = all_at_once(
        CLIENTS, lambda _: send(base_url, "POST", "/api/scenarios", scenario_body(), headers)
    )

    assert [r.status_code for r in responses] == [201] * CLIENTS, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == CLIENTS - 1
    assert topics_since(event_log, position) == Counter({CREATED: 1, RECEIPT: 1})


def test_a_stale_if_match_among_concurrent_updates_is_the_only_conflict(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    scenarios = [uuid.UUID(create_scenario(base_url, tenant)["id"]) for _ in range(CLIENTS - 1)]
    contested = scenarios[0]
    # Two writers both based on version 1 of one scenario, among 30 others each updating
    # its own scenario: both pass the check, so the pair can meet in one transaction.
    targets = [contested, *scenarios]

    def update(index: int) -> Any:
        return send(
            base_url,
            "PATCH",
            f"/api/scenarios/{targets[index]}",
            {"name": f"Renamed {index}"},
            {**command_headers(tenant.writer), "If-Match": '"1"'},
        )

    responses = all_at_once(CLIENTS, update)

    pair = [r for index, r in enumerate(responses) if targets[index] == contested]
    others = [r for index, r in enumerate(responses) if targets[index] != contested]
    assert sorted(r.status_code for r in pair) == [200, 409], [r.text for r in pair]
    [conflict] = [r for r in pair if r.status_code == 409]
    assert conflict.json()["error"]["code"] == "VERSION_CONFLICT"
    assert [r.status_code for r in others] == [200] * (CLIENTS - 2), [r.text for r in others]
    assert versions_of(event_log, contested) == [1, 2]
    for scenario_id in scenarios[1:]:
        assert versions_of(event_log, scenario_id) == [1, 2]


def test_refused_shared_transactions_lose_and_double_nothing_acknowledged(
    base_url: str, tenant: Tenant, event_log: EventLog
) -> None:
    # 16 keys, each sent twice at once with the same body: any shared transaction that
    # holds both of a pair is refused (one receipt id twice) and must be split, so that
    # one of the pair commits and the other replays it.
    keys = [f"pair-{index}-{uuid.uuid4().hex}" for index in range(CLIENTS // 2)]
    position = event_log.position()

    responses = all_at_once(
        CLIENTS,
        lambda index: send(
            base_url,
            "POST",
            "/api/scenarios",
            scenario_body(name=f"Plan {index // 2}"),
            command_headers(tenant.writer, keys[index // 2]),
        ),
    )

    assert [r.status_code for r in responses] == [201] * CLIENTS, [r.text for r in responses]
    for pair in range(CLIENTS // 2):
        first, second = responses[2 * pair], responses[2 * pair + 1]
        assert first.content == second.content
        replayed = [r.headers.get("Idempotent-Replayed") for r in (first, second)]
        assert sorted(replayed, key=str) == sorted(["true", None], key=str)
    acknowledged = sorted({uuid.UUID(r.json()["id"]) for r in responses})
    assert len(acknowledged) == CLIENTS // 2
    assert sorted(created_ids_since(event_log, position)) == acknowledged
    receipts = receipts_since(event_log, position)
    assert sorted(r.idempotency_key for r in receipts) == sorted(keys)
    # Every receipt stores the very bytes its key answered.
    answered = {keys[index // 2]: r.content for index, r in enumerate(responses)}
    for receipt in receipts:
        assert receipt.body.encode() == answered[receipt.idempotency_key]
        assert msgspec.json.decode(receipt.body)["id"] in {str(i) for i in acknowledged}
