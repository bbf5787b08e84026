"""Audit reads over HTTP, on both backends: auditor keys page the tenant's log (every event
once, in order, its chain ending at the signed checkpoint), read one aggregate's history,
check the checkpoint's signature with the served key, and get the dashboard as it was at a
position or time; other roles get 403 and no tenant sees another's events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx2
import msgspec
import pytest
from openapi_schema_validator import OAS31Validator
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from commands.context import Collaborators
from domain import audit
from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from domain.scenario_spec import Baseline, Hiring
from infra.eventstore import EventLog
from infra.settings import Settings
from infra.signing import verify_signature
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body
from tests.readapi.test_reads import create, read, request_forecast, settle

Body = dict[str, Any]
AUDIT_PATHS = (
    "/api/audit/events",
    "/api/audit/aggregates/{id}/events",
    "/api/audit/checkpoint",
    "/api/audit/public-key",
    "/api/audit/dashboard?asOf=0",
)


@pytest.fixture
def live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """The embedded process without job workers (forecasts stay queued)."""
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


def body_of(response: httpx2.Response) -> Body:
    assert response.status_code == 200, response.text
    body: Body = response.json()
    return body


def walk(client: TestClient, key: str, limit: int) -> list[Body]:
    """Every event of the key's tenant, page by page with after=nextAfter."""
    events: list[Body] = []
    after = 0
    while True:
        page = body_of(read(client, key, f"/api/audit/events?after={after}&limit={limit}"))
        events.extend(page["data"])
        if page["nextAfter"] is None:
            return events
        assert page["nextAfter"] == page["data"][-1]["position"]
        after = page["nextAfter"]


def activity(client: TestClient, tenant: Tenant) -> tuple[str, httpx2.Response]:
    """A scenario created, renamed and archived, another with a forecast: the scenario's id
    and the last command's answer (after every projection applied it)."""
    first = create(client, tenant, name="first")
    second = create(
        client, tenant, name="second", type="REVENUE_INCREASE", assumptions={"percent": 10}
    )
    request_forecast(client, tenant, second["id"])
    renamed = client.patch(
        f"/api/scenarios/{first['id']}",
        json={"name": "renamed"},
        headers=command_headers(tenant.writer),
    )
    settle(client, renamed)
    archived = client.post(
        f"/api/scenarios/{first['id']}/archive", headers=command_headers(tenant.writer)
    )
    settle(client, archived)
    return first["id"], archived


def recomputed_chain(log: EventLog, tenant_id: uuid.UUID) -> list[tuple[int, str]]:
    """The tenant's (position, chain value) pairs recomputed from the event store itself."""
    chain: list[tuple[int, str]] = []
    value = audit.GENESIS
    for stored in log.recorder.select_notifications(start=None, limit=100_000):
        if getattr(log.mapper.to_domain_event(stored), "tenant_id", None) != tenant_id:
            continue
        hashed = audit.event_hash(
            stored.id, stored.originator_id, stored.originator_version, stored.topic, stored.state
        )
        value = audit.chain_next(value, hashed)
        chain.append((stored.id, value))
    return chain


def cache_lookups() -> float:
    return sum(
        REGISTRY.get_sample_value("accubooks_cache_requests_total", {"result": result}) or 0.0
        for result in ("hit", "miss", "error")
    )


def test_paging_by_position_covers_the_log_once_and_ends_at_the_checkpoint(
    live: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    scenario_id, last = activity(live, tenant)

    whole = body_of(read(live, tenant.auditor, "/api/audit/events?limit=1000"))
    by_twos = walk(live, tenant.auditor, limit=2)
    by_default = walk(live, tenant.auditor, limit=100)
    checkpoint = body_of(read(live, tenant.auditor, "/api/audit/checkpoint"))

    events = whole["data"]
    positions = [e["position"] for e in events]
    assert whole["nextAfter"] is None
    assert by_twos == events and by_default == events
    assert positions == sorted(set(positions))
    assert positions[-1] == int(last.headers["X-Consistency-Token"])
    # The CLI's events of the tenant are in its log too.
    assert [e["type"] for e in events[:4]] == [
        "accubooks:Tenant.Registered", *["accubooks:ApiKey.Issued"] * 3,
    ]  # fmt: skip
    assert checkpoint["chainHash"] == events[-1]["chainHash"]
    assert checkpoint["eventCount"] == len(events)
    assert checkpoint["position"] == positions[-1]
    assert checkpoint["tenantId"] == str(tenant.tenant_id)
    assert [(e["position"], e["chainHash"]) for e in events] == recomputed_chain(
        event_log, tenant.tenant_id
    )
    [created] = [e for e in events if e["aggregateId"] == scenario_id and e["version"] == 1]
    assert created["actor"] == str(tenant.writer_key_id)
    assert created["version"] == 1
    assert created["payload"]["name"] == "first"
    assert created["payload"]["tenant_id"] == str(tenant.tenant_id)
    assert created["payload"]["baseline"]["openingCash"] == "250000.00"
    assert not {"originator_id", "originator_version"} & set(created["payload"])
    assert last.headers["X-Request-Id"] == events[-1]["requestId"]

    history = body_of(read(live, tenant.auditor, f"/api/audit/aggregates/{scenario_id}/events"))
    assert history["aggregateId"] == scenario_id
    assert [e["version"] for e in history["data"]] == [1, 2, 3]
    assert history["data"] == [e for e in events if e["aggregateId"] == scenario_id]
    assert [e["type"] for e in history["data"]][1:] == [
        "accubooks:Scenario.Renamed", "accubooks:Scenario.Archived",
    ]  # fmt: skip


def test_a_page_is_one_statement_and_audit_reads_bypass_the_cache(
    live: TestClient, tenant: Tenant
) -> None:
    activity(live, tenant)
    store = live.app.state.read_api.store  # type: ignore[attr-defined]
    statements: list[str] = []
    read(live, tenant.reader, "/api/dashboard")
    before = cache_lookups()
    store.on_statement = statements.append
    try:
        for path in ("/api/audit/events?limit=3", "/api/audit/events?after=5&limit=1000"):
            statements.clear()
            assert read(live, tenant.auditor, path).status_code == 200
            # The readiness poller shares the store: only this read's statements count.
            ours = [s for s in statements if "audit_events" in s]
            assert len(ours) == 1, (path, statements)
        for path in ("/api/audit/checkpoint", "/api/audit/dashboard?asOf=1"):
            assert read(live, tenant.auditor, path).status_code == 200
    finally:
        store.on_statement = None
    assert cache_lookups() == before
    assert read(live, tenant.reader, "/api/dashboard").status_code == 200
    assert cache_lookups() > before


def test_an_audit_read_with_a_consistency_token_sees_that_write(
    live: TestClient, tenant: Tenant
) -> None:
    created = live.post(
        "/api/scenarios",
        json=scenario_body(name="just now"),
        headers=command_headers(tenant.writer),
    )
    token = created.headers["X-Consistency-Token"]
    headers = {"Authorization": f"Bearer {tenant.auditor}", "X-Consistency-Token": token}

    page = live.get("/api/audit/events?limit=1000", headers=headers)
    checkpoint = live.get("/api/audit/checkpoint", headers=headers)
    malformed = live.get("/api/audit/events", headers={**headers, "X-Consistency-Token": "x"})

    events = body_of(page)["data"]
    assert events[-1]["position"] == int(token)
    assert created.json()["id"] in {e["aggregateId"] for e in events}
    assert int(page.headers["X-Projection-Position"]) >= int(token)
    assert body_of(checkpoint)["position"] >= int(token)
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "VALIDATION_ERROR"


def test_reader_and_writer_keys_are_forbidden_on_every_audit_route(
    live: TestClient, tenant: Tenant
) -> None:
    scenario_id = create(live, tenant)["id"]
    for template in AUDIT_PATHS:
        path = template.replace("{id}", scenario_id)
        for key in (tenant.reader, tenant.writer):
            response = read(live, key, path)
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"]["code"] == "FORBIDDEN"
        assert live.get(path).status_code == 401
        assert read(live, tenant.auditor, path).status_code == 200, path


def test_no_tenant_sees_another_tenants_events(
    live: TestClient, tenant: Tenant, operator: Collaborators
) -> None:
    other = make_tenant(operator, "Other")
    theirs = create(live, other, name="theirs")
    request_forecast(live, other, theirs["id"])
    mine = create(live, tenant, name="mine")

    events = walk(live, tenant.auditor, limit=3)
    their_events = walk(live, other.auditor, limit=3)
    checkpoint = body_of(read(live, tenant.auditor, "/api/audit/checkpoint"))

    assert {e["payload"]["tenant_id"] for e in events} == {str(tenant.tenant_id)}
    assert {e["payload"]["tenant_id"] for e in their_events} == {str(other.tenant_id)}
    assert not {e["position"] for e in events} & {e["position"] for e in their_events}
    assert mine["id"] in {e["aggregateId"] for e in events}
    assert theirs["id"] not in {e["aggregateId"] for e in events}
    assert checkpoint["eventCount"] == len(events)
    for path in (
        f"/api/audit/aggregates/{theirs['id']}/events",
        f"/api/audit/aggregates/{other.tenant_id}/events",
        f"/api/audit/aggregates/{uuid.uuid4()}/events",
        "/api/audit/aggregates/not-a-uuid/events",
    ):
        response = read(live, tenant.auditor, path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "NOT_FOUND"
    assert read(live, other.auditor, f"/api/audit/aggregates/{theirs['id']}/events").is_success


def test_the_checkpoint_signature_verifies_with_the_served_key_and_not_when_altered(
    live: TestClient, tenant: Tenant
) -> None:
    activity(live, tenant)
    checkpoint = body_of(read(live, tenant.auditor, "/api/audit/checkpoint"))
    key = body_of(read(live, tenant.auditor, "/api/audit/public-key"))

    def verifies(c: Body) -> bool:
        message = audit.checkpoint_message(
            c["tenantId"], c["position"], c["chainHash"], c["eventCount"]
        )
        return verify_signature(key["publicKey"], message, c["signature"])

    assert key["algorithm"] == checkpoint["algorithm"] == "Ed25519"
    assert key["keyId"] == checkpoint["keyId"]
    assert verifies(checkpoint)
    kept = msgspec.json.decode(msgspec.json.encode(checkpoint), type=audit.Checkpoint)
    assert verify_signature(key["publicKey"], kept.message(), kept.signature)
    altered = [
        {**checkpoint, "position": checkpoint["position"] + 1},
        {**checkpoint, "eventCount": checkpoint["eventCount"] - 1},
        {**checkpoint, "chainHash": audit.GENESIS},
        {**checkpoint, "tenantId": str(uuid.uuid4())},
    ]
    for forged in altered:
        assert not verifies(forged), forged


def test_a_tenant_not_yet_projected_is_at_the_genesis_checkpoint(
    client: TestClient, tenant: Tenant
) -> None:
    """No projection runs in this process: the audit model is empty, the chain unstarted."""
    checkpoint = body_of(read(client, tenant.auditor, "/api/audit/checkpoint"))
    key = body_of(read(client, tenant.auditor, "/api/audit/public-key"))
    page = body_of(read(client, tenant.auditor, "/api/audit/events"))

    assert (checkpoint["position"], checkpoint["chainHash"], checkpoint["eventCount"]) == (
        0, audit.GENESIS, 0,
    )  # fmt: skip
    message = audit.checkpoint_message(str(tenant.tenant_id), 0, audit.GENESIS, 0)
    assert verify_signature(key["publicKey"], message, checkpoint["signature"])
    assert page == {"data": [], "nextAfter": None}


@pytest.mark.parametrize(
    "query",
    [
        "events?limit=0",
        "events?limit=1001",
        "events?limit=abc",
        "events?limit=-1",
        "events?after=-1",
        "events?after=x",
        "events?after=1.5",
        "events?after=9223372036854775808",
        "events?cursor=abc",
        "checkpoint?tenant=x",
        "dashboard",
        "dashboard?asOf=",
        "dashboard?asOf=-1",
        "dashboard?asOf=99999999999999999999",
        "dashboard?asOf=yesterday",
        "dashboard?asOf=2026-13-01T00:00:00Z",
        "dashboard?asOf=2026-01-01",
        "dashboard?asOf=2026-01-01T10:00:00",
        "dashboard?asOf=1&page=2",
    ],
)
def test_malformed_audit_queries_are_refused_in_the_envelope(
    live: TestClient, tenant: Tenant, query: str
) -> None:
    response = read(live, tenant.auditor, f"/api/audit/{query}")

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["message"] and error["requestId"] == response.headers["X-Request-Id"]


def test_the_dashboard_as_of_a_point_is_the_dashboard_served_then(
    live: TestClient, tenant: Tenant, operator: Collaborators
) -> None:
    other = make_tenant(operator, "Other")
    first = create(live, tenant, name="first")
    request_forecast(live, tenant, first["id"])
    create(live, other, name="theirs")
    captured = read(live, tenant.reader, "/api/dashboard")
    position = int(captured.headers["X-Projection-Position"])
    moment = datetime.now(UTC)

    second = create(
        live, tenant, name="second", type="REVENUE_INCREASE", assumptions={"percent": 5}
    )
    request_forecast(live, tenant, second["id"])
    request_forecast(live, other, create(live, other)["id"])
    archived = live.post(
        f"/api/scenarios/{first['id']}/archive", headers=command_headers(tenant.writer)
    )
    settle(live, archived)
    current = read(live, tenant.reader, "/api/dashboard")

    def as_of(point: str) -> httpx2.Response:
        return live.get(
            "/api/audit/dashboard",
            params={"asOf": point},
            headers={"Authorization": f"Bearer {tenant.auditor}"},
        )

    at_position = as_of(str(position))
    at_time = as_of(moment.isoformat())
    at_zulu = as_of(moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    unencoded_plus = read(live, tenant.auditor, f"/api/audit/dashboard?asOf={moment.isoformat()}")
    now = as_of(current.headers["X-Projection-Position"])
    start = as_of("0")

    assert body_of(at_position) == captured.json() != current.json()
    assert captured.json()["scenarios"]["total"] == 1
    assert current.json()["scenarios"]["archived"] == 1
    assert at_position.headers["X-Projection-Position"] == str(position)
    for answer in (at_time, at_zulu, unencoded_plus):
        assert body_of(answer) == captured.json()
        reflected = answer.headers["X-Projection-Position"]
        assert body_of(as_of(reflected)) == captured.json()
        assert position <= int(reflected) < int(current.headers["X-Projection-Position"])
    assert body_of(now) == current.json()
    assert body_of(start) == {
        "scenarios": {"total": 0, "active": 0, "archived": 0, "byType": {}},
        "forecasts": {"total": 0, "queued": 0, "running": 0, "completed": 0, "failed": 0},
        "lastActivityAt": None,
    }


def test_audit_answers_match_their_documented_schemas(live: TestClient, tenant: Tenant) -> None:
    scenario_id, _ = activity(live, tenant)
    doc = body_of(live.get("/openapi.json"))
    paths = {
        "getAuditEvents": "/api/audit/events?limit=2",
        "getAggregateEvents": f"/api/audit/aggregates/{scenario_id}/events",
        "getAuditCheckpoint": "/api/audit/checkpoint",
        "getAuditPublicKey": "/api/audit/public-key",
        "getAuditDashboard": "/api/audit/dashboard?asOf=2026-01-01T00:00:00Z",
    }
    for operation_id, url in paths.items():
        [operation] = [
            op for item in doc["paths"].values() for op in item.values()
            if op["operationId"] == operation_id
        ]  # fmt: skip
        assert "403" in operation["responses"], operation_id
        success = operation["responses"]["200"]
        response = read(live, tenant.auditor, url)
        assert response.status_code == 200, (operation_id, response.text)
        for name, header in success["headers"].items():
            if header.get("required"):
                assert name in response.headers, f"{operation_id} answers no {name}"
        schema = {
            **success["content"]["application/json"]["schema"],
            "components": doc["components"],
        }
        validator = OAS31Validator(schema, format_checker=OAS31Validator.FORMAT_CHECKER)
        errors = [e.message for e in validator.iter_errors(response.json())]
        assert not errors, f"{operation_id}: {errors}"


def test_a_long_log_is_replayed_page_by_page_to_the_same_dashboard(
    live: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    """1,500 scenarios and 300 forecasts, arranged through the log: more than a page of
    replay before the captured point and after it."""
    actor = Actor(tenant_id=tenant.tenant_id, actor_id="bulk", request_id="bulk")
    baseline = Baseline(
        start_month="2026-01",
        opening_cash=Decimal("1000.00"),
        monthly_revenue=Decimal("100.00"),
        monthly_costs=Decimal("90.00"),
    )

    def save(count: int) -> int:
        at = datetime.now(UTC)
        scenarios = [
            Scenario.create(
                actor,
                scenario_id=uuid.uuid4(),
                name="bulk",
                baseline=baseline,
                assumptions=Hiring(headcount=1, monthly_cost_per_head=Decimal("10")),
                at=at,
            )
            for _ in range(count)
        ]
        forecasts = [
            Forecast.request(
                actor, forecast_id=uuid.uuid4(), scenario=s, horizon_months=12, paths=10, at=at
            )
            for s in scenarios[::5]
        ]
        last: int = event_log.save(*scenarios, *forecasts)[-1].notification.id
        assert live.app.state.projections.wait_for(last, 60.0)  # type: ignore[attr-defined]
        return last

    save(1_200)
    captured = read(live, tenant.reader, "/api/dashboard")
    save(300)
    current = read(live, tenant.reader, "/api/dashboard")

    then = read(
        live,
        tenant.auditor,
        f"/api/audit/dashboard?asOf={captured.headers['X-Projection-Position']}",
    )
    now = read(live, tenant.auditor, f"/api/audit/dashboard?asOf={2**62}")

    assert captured.json()["scenarios"]["total"] == 1_200
    assert body_of(then) == captured.json()
    assert body_of(now) == current.json()
    assert current.json()["forecasts"]["queued"] == 300
    assert now.headers["X-Projection-Position"] == current.headers["X-Projection-Position"]
