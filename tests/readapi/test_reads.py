"""Reads over projections, on both backends: what commands did shows up (waiting on the
projection position, never sleeping), pages and cursors behave, tenants stay apart, and
every read is one SQL statement whatever the tenant's size."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx2
import msgspec
import pytest
from starlette.testclient import TestClient

from commands.context import Collaborators
from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from domain.scenario_spec import Baseline, Hiring
from infra.eventstore import EventLog
from infra.readstore import counted_statements
from infra.settings import Settings
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body


@pytest.fixture
def live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """The embedded process: API and projection workers together (no job workers, so
    forecasts stay queued and reads are deterministic)."""
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def uncached_live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """The embedded process without its read cache: every read reaches the database."""
    uncached = msgspec.structs.replace(settings, cache_enabled=False)
    app = create_app(uncached, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


def settle(client: TestClient, response: httpx2.Response) -> None:
    """Waits (bounded) until every projection has applied the command's events."""
    token = int(response.headers["X-Consistency-Token"])
    assert client.app.state.projections.wait_for(token, 10.0)  # type: ignore[attr-defined]


def read(client: TestClient, key: str, path: str) -> httpx2.Response:
    return client.get(path, headers={"Authorization": f"Bearer {key}"})


def create(client: TestClient, tenant: Tenant, **overrides: Any) -> dict[str, Any]:
    response = client.post(
        "/api/scenarios", json=scenario_body(**overrides), headers=command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    settle(client, response)
    body: dict[str, Any] = response.json()
    return body


def request_forecast(client: TestClient, tenant: Tenant, scenario_id: str) -> str:
    response = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, "horizonMonths": 12, "paths": 100},
        headers=command_headers(tenant.writer),
    )
    assert response.status_code == 202, response.text
    settle(client, response)
    forecast_id: str = response.json()["forecastId"]
    return forecast_id


def test_commands_show_up_in_every_read(live: TestClient, tenant: Tenant) -> None:
    created = create(live, tenant)
    forecast_id = request_forecast(live, tenant, created["id"])
    renamed = live.patch(
        f"/api/scenarios/{created['id']}",
        json={"name": "Renamed"},
        headers=command_headers(tenant.writer),
    )
    settle(live, renamed)

    listing = read(live, tenant.reader, "/api/scenarios")
    detail = read(live, tenant.reader, f"/api/scenarios/{created['id']}")
    forecasts = read(live, tenant.auditor, "/api/forecasts")
    forecast = read(live, tenant.writer, f"/api/forecasts/{forecast_id}")
    dashboard = read(live, tenant.reader, "/api/dashboard")
    usage = read(live, tenant.reader, "/api/usage")

    [item] = listing.json()["data"]
    assert item["name"] == "Renamed"
    assert item["forecastCount"] == 1
    assert item["version"] == 2
    assert item["baseline"] == created["baseline"]
    assert item["assumptions"] == created["assumptions"]
    assert listing.json()["pagination"] == {"page": 1, "limit": 20, "total": 1, "pages": 1}
    assert listing.json()["nextCursor"] is None
    assert detail.json()["latestForecasts"][0]["id"] == forecast_id
    assert detail.json()["latestForecasts"][0]["status"] == "queued"
    assert forecasts.json()["data"][0]["scenario"] == {
        "id": created["id"],
        "name": "Renamed",
        "type": "HIRING",
    }
    assert forecast.json()["status"] == "queued"
    assert forecast.json()["result"] is None
    assert dashboard.json()["scenarios"] == {
        "total": 1,
        "active": 1,
        "archived": 0,
        "byType": {"HIRING": 1},
    }
    assert dashboard.json()["forecasts"]["queued"] == 1
    month = datetime.now(UTC).strftime("%Y-%m")
    assert usage.json()["month"] == month
    assert usage.json()["scenariosCreated"] == 1
    assert usage.json()["forecastsRequested"] == 1
    assert usage.json()["commandsAccepted"] == 3
    for response in (listing, detail, forecasts, forecast, dashboard, usage):
        assert response.status_code == 200
        assert int(response.headers["X-Projection-Position"]) >= int(
            renamed.headers["X-Consistency-Token"]
        )


def test_archived_scenarios_are_counted_apart(live: TestClient, tenant: Tenant) -> None:
    first = create(live, tenant)
    create(live, tenant, type="REVENUE_INCREASE", assumptions={"percent": 12.5})
    archived = live.post(
        f"/api/scenarios/{first['id']}/archive", headers=command_headers(tenant.writer)
    )
    settle(live, archived)

    dashboard = read(live, tenant.reader, "/api/dashboard").json()

    assert dashboard["scenarios"] == {
        "total": 2,
        "active": 1,
        "archived": 1,
        "byType": {"HIRING": 1, "REVENUE_INCREASE": 1},
    }
    detail = read(live, tenant.reader, f"/api/scenarios/{first['id']}").json()
    assert detail["status"] == "archived"


def test_pages_and_cursors_walk_the_whole_list_newest_first(
    live: TestClient, tenant: Tenant
) -> None:
    names = [f"s{i:02d}" for i in range(7)]
    for name in names:
        create(live, tenant, name=name)

    by_page = [
        read(live, tenant.reader, f"/api/scenarios?limit=3&page={page}").json()
        for page in (1, 2, 3)
    ]
    walked: list[str] = []
    url = "/api/scenarios?limit=3"
    while url:
        body = read(live, tenant.reader, url).json()
        walked.extend(item["name"] for item in body["data"])
        url = f"/api/scenarios?limit=3&cursor={body['nextCursor']}" if body["nextCursor"] else ""

    newest_first = list(reversed(names))
    assert [i["name"] for page in by_page for i in page["data"]] == newest_first
    assert walked == newest_first
    assert by_page[0]["pagination"] == {"page": 1, "limit": 3, "total": 7, "pages": 3}
    assert by_page[2]["nextCursor"] is None
    assert by_page[0]["nextCursor"] is not None


def test_forecast_filters_narrow_the_list_and_its_total(live: TestClient, tenant: Tenant) -> None:
    one = create(live, tenant, name="one")
    two = create(live, tenant, name="two")
    mine = [request_forecast(live, tenant, one["id"]) for _ in range(3)]
    request_forecast(live, tenant, two["id"])

    filtered = read(
        live, tenant.reader, f"/api/forecasts?scenarioId={one['id']}&status=queued&limit=2"
    )
    following = read(
        live,
        tenant.reader,
        f"/api/forecasts?scenarioId={one['id']}&status=queued&limit=2"
        f"&cursor={filtered.json()['nextCursor']}",
    )
    nothing = read(live, tenant.reader, "/api/forecasts?status=completed")

    assert filtered.json()["pagination"]["total"] == 3
    ids = [f["id"] for f in filtered.json()["data"] + following.json()["data"]]
    assert ids == list(reversed(mine))
    assert nothing.json()["data"] == []
    assert nothing.json()["pagination"]["total"] == 0


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=-1",
        "limit=100000",
        "page=0",
        "page=x",
        "sort=name",
    ],
)
def test_paging_values_out_of_range_are_refused(
    live: TestClient, tenant: Tenant, query: str
) -> None:
    response = read(live, tenant.reader, f"/api/scenarios?{query}")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_forged_foreign_or_malformed_cursors_are_refused(
    live: TestClient, tenant: Tenant, operator: Collaborators
) -> None:
    for i in range(3):
        create(live, tenant, name=f"s{i}")
    cursor = read(live, tenant.reader, "/api/scenarios?limit=1").json()["nextCursor"]
    payload, mac = cursor.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + mac
    other = make_tenant(operator, "Other")

    answers = [
        read(live, tenant.reader, f"/api/scenarios?cursor={forged}"),
        read(live, tenant.reader, "/api/scenarios?cursor=not-a-cursor"),
        read(live, tenant.reader, "/api/scenarios?cursor=%00%01"),
        read(live, other.reader, f"/api/scenarios?cursor={cursor}"),
        read(live, tenant.reader, f"/api/forecasts?cursor={cursor}&status=queued"),
    ]

    for response in answers:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "INVALID_CURSOR"
    both = read(live, tenant.reader, f"/api/scenarios?cursor={cursor}&page=2")
    assert both.status_code == 400


def test_no_read_shows_another_tenants_data(
    live: TestClient, tenant: Tenant, operator: Collaborators
) -> None:
    other = make_tenant(operator, "Other")
    theirs = create(live, other, name="theirs")
    their_forecast = request_forecast(live, other, theirs["id"])
    create(live, tenant, name="mine")

    listing = read(live, tenant.reader, "/api/scenarios").json()
    forecasts = read(live, tenant.reader, "/api/forecasts").json()
    dashboard = read(live, tenant.reader, "/api/dashboard").json()
    usage = read(live, tenant.reader, "/api/usage").json()

    assert [s["name"] for s in listing["data"]] == ["mine"]
    assert forecasts["data"] == []
    assert dashboard["forecasts"]["total"] == 0
    assert dashboard["scenarios"]["total"] == 1
    assert usage["forecastsRequested"] == 0
    for path in (
        f"/api/scenarios/{theirs['id']}",
        f"/api/forecasts/{their_forecast}",
        f"/api/forecasts?scenarioId={theirs['id']}",
    ):
        response = read(live, tenant.reader, path)
        if response.status_code == 200:
            assert response.json()["data"] == []
        else:
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "NOT_FOUND"


def test_reads_need_a_key(live: TestClient) -> None:
    for path in ("/api/scenarios", "/api/dashboard", "/api/usage", "/api/forecasts"):
        response = live.get(path)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "UNAUTHORIZED"


def test_every_read_is_one_statement_for_a_large_tenant(
    uncached_live: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    """1,000 scenarios and 3,000 forecasts, arranged through the log and the runner."""
    live = uncached_live
    actor = Actor(tenant_id=tenant.tenant_id, actor_id="bulk", request_id="bulk")
    at = datetime.now(UTC)
    baseline = Baseline(
        start_month="2026-01",
        opening_cash=__import__("decimal").Decimal("1000.00"),
        monthly_revenue=__import__("decimal").Decimal("100.00"),
        monthly_costs=__import__("decimal").Decimal("90.00"),
    )
    assumptions = Hiring(headcount=1, monthly_cost_per_head=__import__("decimal").Decimal("10"))
    scenario_ids: list[str] = []
    for _ in range(10):
        batch = [
            Scenario.create(
                actor,
                scenario_id=uuid.uuid4(),
                name="bulk",
                baseline=baseline,
                assumptions=assumptions,
                at=at,
            )
            for _ in range(100)
        ]
        forecasts = [
            Forecast.request(
                actor, forecast_id=uuid.uuid4(), scenario=s, horizon_months=12, paths=10, at=at
            )
            for s in batch
            for _ in range(3)
        ]
        recordings = event_log.save(*batch, *forecasts)
        scenario_ids.extend(str(s.id) for s in batch)
    last = recordings[-1].notification.id
    assert live.app.state.projections.wait_for(last, 60.0)  # type: ignore[attr-defined]
    listing = read(live, tenant.reader, "/api/forecasts?limit=100").json()
    some_forecast = listing["data"][0]["id"]
    cursor = listing["nextCursor"]
    paths = [
        "/api/scenarios?limit=100",
        "/api/scenarios?limit=100&page=7",
        f"/api/scenarios/{scenario_ids[500]}",
        "/api/forecasts?limit=100",
        f"/api/forecasts?limit=100&cursor={cursor}",
        f"/api/forecasts?scenarioId={scenario_ids[3]}&status=queued",
        f"/api/forecasts/{some_forecast}",
        "/api/dashboard",
        "/api/usage",
    ]
    for path in paths:
        # Only this read's statements count (readapi.test_statements has every route).
        with counted_statements() as statements:
            response = read(live, tenant.reader, path)
        assert response.status_code == 200, response.text
        assert len(statements) == 1, (path, statements)
    dashboard = read(live, tenant.reader, "/api/dashboard").json()
    assert dashboard["scenarios"]["total"] == 1000
    assert dashboard["forecasts"]["total"] == 3000
