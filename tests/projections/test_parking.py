"""A projector that raises on one event (case 13), on both backends: the worker retries the
batch a bounded number of times, then parks that event and applies the rest; the other
projections go on; the parked event is reported (log, readiness, metrics, CLI) and, after
the fix, replayed by the CLI so that the read model equals a fresh replay. The bug is a
subclass of the real scenarios projector, used only here; the fault's input is real: a
scenario named "poison" created over HTTP."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import msgspec
import pytest
from starlette.testclient import TestClient

from domain.scenario import Scenario
from infra.eventstore import EventLog
from infra.settings import Settings
from projections import parking
from projections.readmodel import Positioned, Projector, Tx
from projections.runner import ProjectionRunner
from projections.scenarios import ScenariosProjector
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.projections.test_projection_processes import dump, store_of
from tests.projections.test_projection_processes import rebuild as fresh_replay
from tests.projections.test_rebuild import accubooks  # noqa: F401 (a fixture)

POISON = "poison"
WAIT_S = 30.0
# The backoff of the first retry (doubled for the next): long enough that the other
# projections are seen caught up while the failing one still retries.
RETRY_S = 1.0
ATTEMPTS = 3


class PoisonedScenarios(ScenariosProjector):
    """The scenarios projector with a bug: while ``broken``, any batch holding the
    creation of a scenario named "poison" raises (before any row changes)."""

    name: ClassVar[str] = "scenarios"

    def __init__(self) -> None:
        self.broken = True

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        if self.broken and any(
            isinstance(e, Scenario.Created) and e.name == POISON for e, _ in events
        ):
            raise ValueError("cannot project a scenario named poison")
        super().apply(tx, events)


def with_poison(poisoned: PoisonedScenarios) -> list[Projector]:
    return [poisoned if p.name == "scenarios" else p for p in wiring.projectors()]


@pytest.fixture
def quick(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings, projection_attempts=ATTEMPTS, projection_retry_s=RETRY_S
    )


@pytest.fixture
def api(quick: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """The HTTP API without projection workers of its own (the test runs them)."""
    app = create_app(quick, event_log=event_log, run_projections=False, run_jobs=False)
    with TestClient(app) as client:
        yield client


def create(api: TestClient, tenant: Tenant, name: str) -> str:
    response = api.post(
        "/api/scenarios", json=scenario_body(name=name), headers=command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    scenario_id: str = response.json()["id"]
    return scenario_id


def rename(api: TestClient, tenant: Tenant, scenario_id: str, name: str) -> None:
    response = api.patch(
        f"/api/scenarios/{scenario_id}", json={"name": name}, headers=command_headers(tenant.writer)
    )
    assert response.status_code == 200, response.text


def request_forecast(api: TestClient, tenant: Tenant, scenario_id: str) -> None:
    response = api.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, "horizonMonths": 12, "paths": 100},
        headers=command_headers(tenant.writer),
    )
    assert response.status_code == 202, response.text


def assert_same_rows(
    live: dict[str, list[tuple[Any, ...]]], fresh: dict[str, list[tuple[Any, ...]]]
) -> None:
    assert live.keys() == fresh.keys()
    for table, rows in live.items():
        assert rows == fresh[table], table


def readiness(api: TestClient) -> dict[str, Any]:
    response = api.get("/health/ready")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def without(rows: dict[str, list[tuple[Any, ...]]], name: str) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of every table but those of the scenarios read model."""
    return {t: r for t, r in rows.items() if not t.startswith(name)}


def test_event_a_projector_fails_on_is_parked_reported_and_replayed_after_the_fix(
    quick: Settings,
    event_log: EventLog,
    tenant: Tenant,
    api: TestClient,
    accubooks: Any,  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [create(api, tenant, f"Scenario {n}") for n in range(2)]
    poison_id = create(api, tenant, POISON)
    ids += [create(api, tenant, f"Scenario {n}") for n in range(2, 4)]
    request_forecast(api, tenant, ids[1])
    poison_position = next(
        n.id
        for n in event_log.recorder.select_notifications(start=1, limit=1000)
        if str(n.originator_id) == poison_id
    )
    poisoned = PoisonedScenarios()
    runner = ProjectionRunner(quick, event_log, with_poison(poisoned))
    caplog.set_level(logging.WARNING, logger="accubooks.projections")
    started = time.monotonic()
    runner.start()
    try:
        end = event_log.position()
        # The other projections are not held up by the failing one: caught up while it
        # is still in its retries (its backoff alone lasts RETRY_S * 3).
        others = [w for name, w in runner.workers.items() if name != "scenarios"]
        assert all(w.wait_for(end, WAIT_S) for w in others)
        assert runner.workers["scenarios"].position < poison_position

        # One batch held every event: the ones before and after the poison are applied,
        # the poison is parked, within the bounded retries.
        assert runner.wait_for(end, WAIT_S)
        parked_after_s = time.monotonic() - started
        # Its backoff: RETRY_S, then twice that; nothing beyond the bounded attempts.
        assert RETRY_S * 3 <= parked_after_s < WAIT_S
        rename(api, tenant, ids[0], "Renamed after the poison")
        end = event_log.position()
        assert runner.wait_for(end, WAIT_S), "later events are applied too"
        [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert f"parked the event at position {poison_position}" in logged.getMessage()

        code, listed = accubooks("projections", "parked")
        assert code == 0
        assert listed is not None
        [entry] = listed
        assert entry["projection"] == "scenarios"
        assert entry["position"] == poison_position
        assert entry["aggregateId"] == poison_id
        assert entry["aggregateVersion"] == 1
        assert entry["topic"].endswith("Scenario.Created")
        assert entry["errorType"] == "ValueError"
        assert entry["errorMessage"] == "cannot project a scenario named poison"
        # The whole batch ATTEMPTS times, then the failing halves of the bisection.
        assert entry["attempts"] > ATTEMPTS

        ready = readiness(api)
        assert ready["status"] == "degraded"
        assert ready["checks"]["parkedEvents"] == {
            "status": "degraded",
            "value": 1,
            "threshold": 0,
            "message": ready["checks"]["parkedEvents"]["message"],
        }
        assert ready["checks"]["projectionLag"]["value"] == 0
        metrics = api.get("/metrics").text
        assert 'accubooks_projection_parked_events{projection="scenarios"} 1.0' in metrics
        assert 'accubooks_projection_parked_events{projection="dashboard"} 0.0' in metrics

        with fresh_replay(quick, event_log) as rebuilt, store_of(quick) as store:
            fresh = dump(rebuilt.finished_store(end))
            live = dump(store)
            # Every other read model equals a fresh replay; the scenarios one lacks
            # exactly the poison (its row and its count).
            assert_same_rows(without(live, "scenarios"), without(fresh, "scenarios"))
            assert live["scenarios_rows"] == [
                r for r in fresh["scenarios_rows"] if r[1] != poison_id
            ]
            [(tenant_id, total)] = fresh["scenarios_tenants"]
            assert live["scenarios_tenants"] == [(tenant_id, total - 1)]

            # Replayed with the bug still in: it fails, and stays parked.
            [failed] = parking.replay(quick, event_log, poisoned, [poison_position])
            assert failed.outcome == "failed"
            assert failed.message == "ValueError: cannot project a scenario named poison"
            assert [p.position for p in parking.parked(quick, [poisoned])] == [poison_position]

            # The fix: the CLI runs the real projector (the worker keeps running).
            code, replayed = accubooks("projections", "replay-parked", "scenarios", "--all")
            assert code == 0, replayed
            assert replayed == [
                {"projection": "scenarios", "position": poison_position, "outcome": "replayed"}
            ]
            assert_same_rows(dump(store), fresh)
        code, listed = accubooks("projections", "parked")
        assert (code, listed) == (0, [])
        ready = readiness(api)
        assert ready["checks"]["parkedEvents"] == {"status": "ok", "value": 0, "threshold": 0}
        assert ready["status"] == "ok"
        code, again = accubooks("projections", "replay-parked", "scenarios", str(poison_position))
        assert code == 2, "replayed once only"
        assert again is not None
        assert again[0]["outcome"] == "refused"
    finally:
        runner.stop()


def test_replay_out_of_order_is_refused_and_all_in_log_order_matches_a_fresh_replay(
    quick: Settings,
    event_log: EventLog,
    tenant: Tenant,
    api: TestClient,
    accubooks: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    """The poison's rename comes after it: the real projector fails on the rename too (no
    row to rename), so both are parked; replaying the creation alone would apply it after
    its rename, and is refused; --all --force replays both, in log order."""
    create(api, tenant, "Before")
    poison_id = create(api, tenant, POISON)
    rename(api, tenant, poison_id, "Renamed poison")
    create(api, tenant, "After")
    poisoned = PoisonedScenarios()
    runner = ProjectionRunner(
        msgspec.structs.replace(quick, projection_retry_s=0.01), event_log, with_poison(poisoned)
    )
    runner.start()
    try:
        end = event_log.position()
        assert runner.wait_for(end, WAIT_S)
        code, listed = accubooks("projections", "parked", "scenarios")
        assert code == 0
        assert listed is not None
        assert [(p["aggregateId"], p["aggregateVersion"]) for p in listed] == [
            (poison_id, 1),
            (poison_id, 2),
        ]
        assert listed[1]["errorType"] == "KeyError"
        first = str(listed[0]["position"])
        code, refused = accubooks("projections", "replay-parked", "scenarios", first)
        assert code == 2
        assert refused is not None
        assert refused[0]["outcome"] == "refused"
        assert "out of order" in refused[0]["message"]

        code, replayed = accubooks("projections", "replay-parked", "scenarios", "--all", "--force")
        assert code == 0, replayed
        assert replayed is not None
        assert [r["outcome"] for r in replayed] == ["replayed", "replayed"]
        with fresh_replay(quick, event_log) as rebuilt, store_of(quick) as store:
            assert_same_rows(dump(store), dump(rebuilt.finished_store(end)))
    finally:
        runner.stop()
