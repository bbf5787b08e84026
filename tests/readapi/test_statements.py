"""Every read route is one SQL statement, on both backends, whatever the page, the cursor,
the filters or the answer (404 included): counted for the request's own context, so the
readiness refresher and the projections sharing the store never blur the count. (That a
statement's cost does not grow with the tenant is perf/scale_bench.py's to measure: its
report carries each statement's plan for a 100,000-scenario tenant.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
from starlette.testclient import TestClient

from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from domain.scenario_spec import Baseline, Hiring
from infra.eventstore import EventLog
from infra.readstore import counted_statements
from infra.settings import Settings
from service.app import create_app
from tests.conftest import Tenant

SCENARIOS = 30
FORECASTS_EACH = 2


@pytest.fixture
def uncached_live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """The embedded process without its read cache: every read reaches the database."""
    uncached = msgspec.structs.replace(settings, cache_enabled=False)
    app = create_app(uncached, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


def seed(client: TestClient, event_log: EventLog, tenant: Tenant) -> tuple[list[str], int]:
    """SCENARIOS scenarios with FORECASTS_EACH forecasts each, saved through the log and
    projected by the app's runner; their ids and the last position."""
    actor = Actor(tenant_id=tenant.tenant_id, actor_id="seed", request_id="seed")
    at = datetime.now(UTC)
    baseline = Baseline(
        start_month="2026-01",
        opening_cash=Decimal("1000.00"),
        monthly_revenue=Decimal("100.00"),
        monthly_costs=Decimal("90.00"),
    )
    made = [
        Scenario.create(
            actor,
            scenario_id=uuid.uuid4(),
            name=f"s{i}",
            baseline=baseline,
            assumptions=Hiring(headcount=1, monthly_cost_per_head=Decimal("10")),
            at=at,
        )
        for i in range(SCENARIOS)
    ]
    requested = [
        Forecast.request(
            actor, forecast_id=uuid.uuid4(), scenario=s, horizon_months=12, paths=10, at=at
        )
        for s in made
        for _ in range(FORECASTS_EACH)
    ]
    recordings = event_log.save(*made, *requested)
    last = recordings[-1].notification.id
    assert client.app.state.projections.wait_for(last, 30.0)  # type: ignore[attr-defined]
    return [str(s.id) for s in made], last


def get(client: TestClient, key: str, path: str, status: int = 200) -> list[str]:
    """The statements the read sent; its status must be ``status``."""
    with counted_statements() as statements:
        response = client.get(path, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == status, (path, response.text)
    return statements


def cursor_of(client: TestClient, key: str, path: str) -> str:
    response = client.get(path, headers={"Authorization": f"Bearer {key}"})
    cursor: str = response.json()["nextCursor"]
    assert cursor, path
    return cursor


def test_every_read_route_is_one_statement(
    uncached_live: TestClient, event_log: EventLog, tenant: Tenant
) -> None:
    live = uncached_live
    scenario_ids, last = seed(live, event_log, tenant)
    key = tenant.reader
    forecast_id = live.get("/api/forecasts", headers={"Authorization": f"Bearer {key}"}).json()[
        "data"
    ][0]["id"]
    unknown = str(uuid.uuid4())
    scenario_cursor = cursor_of(live, key, "/api/scenarios?limit=5&page=2")
    forecast_cursor = cursor_of(live, key, "/api/forecasts?limit=7")
    queued_cursor = cursor_of(live, key, "/api/forecasts?status=queued&limit=4")
    reads = {
        "/api/scenarios": 200,
        "/api/scenarios?limit=5&page=3": 200,
        "/api/scenarios?limit=5&page=99": 200,
        f"/api/scenarios?limit=5&cursor={scenario_cursor}": 200,
        f"/api/scenarios/{scenario_ids[SCENARIOS // 2]}": 200,
        f"/api/scenarios/{unknown}": 404,
        "/api/forecasts": 200,
        f"/api/forecasts?limit=7&cursor={forecast_cursor}": 200,
        f"/api/forecasts?scenarioId={scenario_ids[3]}": 200,
        f"/api/forecasts?status=queued&limit=4&cursor={queued_cursor}": 200,
        f"/api/forecasts?scenarioId={scenario_ids[3]}&status=queued": 200,
        "/api/forecasts?status=failed": 200,
        f"/api/forecasts/{forecast_id}": 200,
        f"/api/forecasts/{unknown}": 404,
        "/api/dashboard": 200,
        "/api/usage": 200,
        "/api/usage?month=2020-01": 200,
    }

    counted = {path: get(live, key, path, status) for path, status in reads.items()}

    for path, statements in counted.items():
        assert len(statements) == 1, (path, statements)
    # The auditor's reads too (a point-in-time replay reads its tenant's log a page of
    # readapi.pointintime.REPLAY_PAGE events per statement: here, one page).
    audit_reads = (
        "/api/audit/events",
        "/api/audit/events?limit=10",
        f"/api/audit/aggregates/{scenario_ids[0]}/events",
        "/api/audit/checkpoint",
        "/api/audit/public-key",
        f"/api/audit/dashboard?asOf={last}",
        "/api/audit/dashboard?asOf=2030-01-01T00:00:00Z",
        "/api/scenarios",
        f"/api/forecasts/{forecast_id}",
    )
    for path in audit_reads:
        statements = get(live, tenant.auditor, path)
        assert len(statements) == 1, (path, statements)
    # The position asked for is reached already: what the read costs plus one check.
    with counted_statements() as statements:
        response = live.get(
            "/api/dashboard",
            headers={"Authorization": f"Bearer {key}", "X-Consistency-Token": str(last)},
        )
    assert response.status_code == 200
    assert len(statements) == 2, statements


def test_refused_reads_send_no_statement(uncached_live: TestClient, tenant: Tenant) -> None:
    for path in ("/api/scenarios?limit=0", "/api/forecasts?status=lost", "/api/usage?month=x"):
        assert get(uncached_live, tenant.reader, path, 400) == []
    assert get(uncached_live, tenant.reader, "/api/scenarios?cursor=forged", 400) == []


def test_page_number_pages_hold_what_the_cursor_walk_holds(
    uncached_live: TestClient, event_log: EventLog, tenant: Tenant
) -> None:
    """Page-number pages skip their offset in the index and read only their own rows:
    the same rows, in the same order, as walking the cursors, under every filter."""
    live = uncached_live
    scenario_ids, _ = seed(live, event_log, tenant)
    headers = {"Authorization": f"Bearer {tenant.reader}"}
    for base in (
        "/api/scenarios?limit=7",
        "/api/forecasts?limit=7",
        "/api/forecasts?limit=7&status=queued",
        f"/api/forecasts?limit=1&scenarioId={scenario_ids[5]}",
        f"/api/forecasts?limit=1&scenarioId={scenario_ids[5]}&status=queued",
    ):
        walked: list[str] = []
        url = base
        while url:
            body = live.get(url, headers=headers).json()
            walked.extend(item["id"] for item in body["data"])
            url = f"{base}&cursor={body['nextCursor']}" if body["nextCursor"] else ""
        first = live.get(base, headers=headers).json()["pagination"]
        numbered = [
            item["id"]
            for page in range(1, first["pages"] + 2)
            for item in live.get(f"{base}&page={page}", headers=headers).json()["data"]
        ]

        assert numbered == walked, base
        assert len(walked) == first["total"], base
