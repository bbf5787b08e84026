"""Tenancy over every declared route, on both backends: tenant A's keys on tenant B's ids
are 404 and leave B's data and the log untouched, A's id-less reads never show B's rows,
and a body can never name the tenant, id, version or status (400, nothing appended).
Routes are enumerated from the OpenAPI declarations, so a new route is covered as it lands.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra import apidoc
from infra.eventstore import EventLog
from infra.settings import Settings
from service import openapi
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body
from tests.readapi.test_reads import read, settle
from tests.services import postgres_database

_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")

# Which of B's ids each declared path parameter takes. A new path parameter must be added
# here (the test named below fails until it is), so no id route escapes the check.
IDS_BY_PARAM: dict[str, tuple[str, ...]] = {
    "scenario_id": ("scenario",),
    "forecast_id": ("forecast",),
    "aggregate_id": ("scenario", "forecast", "tenant"),
}

# A body each command would accept from its own tenant: A's attempt is refused for the id
# alone, not for its body.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "updateScenario": {"name": "Taken over by A"},
    "archiveScenario": {},
}

# Query parameters an id-less read requires, with a value it accepts.
REQUIRED_QUERY: dict[str, str] = {"asOf": "0"}

FORBIDDEN_FIELDS = ("tenantId", "id", "version", "status")


def path_params(op: apidoc.Operation) -> list[str]:
    return _PATH_PARAM.findall(op.path)


ID_OPERATIONS = [op for op in openapi.OPERATIONS if path_params(op)]
ID_CASES = [
    pytest.param(op, kind, id=f"{op.operation_id}-{kind}")
    for op in ID_OPERATIONS
    for param in path_params(op)
    for kind in IDS_BY_PARAM.get(param, ("undeclared",))
]
IDLESS_READS = [
    pytest.param(op, id=op.operation_id)
    for op in openapi.OPERATIONS
    if op.method == "GET" and op.roles and not path_params(op)
]
COMMANDS = [op for op in openapi.OPERATIONS if op.is_command]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """One store per backend for the module: every test makes its own two tenants, and a
    fresh PostgreSQL database per case would cost a second each."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    if request.param == "sqlite":
        yield Settings(data_dir=data_dir)
        return
    with postgres_database() as url:
        yield Settings(database_url=url, data_dir=data_dir)


@pytest.fixture
def live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """API and projection workers, no job workers (forecasts stay queued)."""
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


@dataclass(frozen=True)
class Holdings:
    """Tenant B's data, made through the API and projected."""

    owner: Tenant
    ids: dict[str, str]
    name: str


def command(client: TestClient, key: str, method: str, path: str, body: Any) -> httpx2.Response:
    response = client.request(method, path, json=body, headers=command_headers(key))
    assert response.status_code < 300, response.text
    settle(client, response)
    return response


@pytest.fixture
def tenant_b(live: TestClient, operator: Collaborators) -> Holdings:
    owner = make_tenant(operator, "Tenant B")
    name = f"B-only-{uuid.uuid4().hex[:8]}"
    scenario = command(live, owner.writer, "POST", "/api/scenarios", scenario_body(name=name))
    scenario_id = scenario.json()["id"]
    command(live, owner.writer, "PATCH", f"/api/scenarios/{scenario_id}", {"name": name})
    forecast = command(
        live,
        owner.writer,
        "POST",
        "/api/forecasts/generate",
        {"scenarioId": scenario_id, "horizonMonths": 12, "paths": 100},
    )
    ids = {
        "scenario": scenario_id,
        "forecast": forecast.json()["forecastId"],
        "tenant": str(owner.tenant_id),
    }
    return Holdings(owner=owner, ids=ids, name=name)


@pytest.fixture
def tenant_a(live: TestClient, operator: Collaborators) -> Tenant:
    """A tenant with data of its own, so its lists are not trivially empty."""
    intruder = make_tenant(operator, "Tenant A")
    command(live, intruder.writer, "POST", "/api/scenarios", scenario_body(name="A's own"))
    return intruder


def key_of(tenant: Tenant, role: str) -> str:
    key: str = getattr(tenant, role)
    return key


def snapshot(client: TestClient, holdings: Holdings) -> list[Any]:
    """Everything B can see of its own data, read with B's keys."""
    owner, ids = holdings.owner, holdings.ids
    paths = [
        (owner.reader, f"/api/scenarios/{ids['scenario']}"),
        (owner.reader, f"/api/forecasts/{ids['forecast']}"),
        (owner.reader, "/api/scenarios"),
        (owner.reader, "/api/forecasts"),
        (owner.reader, "/api/dashboard"),
        (owner.auditor, "/api/audit/events?limit=1000"),
        (owner.auditor, "/api/audit/checkpoint"),
    ]
    answers = []
    for key, path in paths:
        response = read(client, key, path)
        assert response.status_code == 200, (path, response.text)
        answers.append(response.json())
    return answers


def assert_not_found(response: httpx2.Response) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "NOT_FOUND"
    assert error["requestId"] == response.headers["X-Request-Id"]


def test_every_path_parameter_names_the_kind_of_id_it_takes() -> None:
    undeclared = {p for op in ID_OPERATIONS for p in path_params(op)} - set(IDS_BY_PARAM)
    assert not undeclared, f"add {sorted(undeclared)} to IDS_BY_PARAM"
    commands_with_ids = {op.operation_id for op in ID_OPERATIONS if op.is_command}
    assert commands_with_ids <= set(VALID_BODIES), "add a valid body to VALID_BODIES"
    # The enumeration itself is not vacuous: the id routes of API.md are all there.
    assert {op.operation_id for op in ID_OPERATIONS} >= {
        "updateScenario",
        "archiveScenario",
        "getScenario",
        "getForecast",
        "getAggregateEvents",
    }


@pytest.mark.parametrize(("op", "kind"), ID_CASES)
def test_another_tenants_id_is_not_found_for_every_role_and_changes_nothing(
    live: TestClient,
    event_log: EventLog,
    tenant_a: Tenant,
    tenant_b: Holdings,
    op: apidoc.Operation,
    kind: str,
) -> None:
    path = op.path
    for param in path_params(op):
        path = path.replace(f"{{{param}}}", tenant_b.ids[kind])
    before = snapshot(live, tenant_b)
    position = event_log.position()

    for role in op.roles:
        headers = (
            command_headers(key_of(tenant_a, role))
            if op.is_command
            else {"Authorization": f"Bearer {key_of(tenant_a, role)}"}
        )
        body = VALID_BODIES[op.operation_id] if op.is_command else None
        response = live.request(op.method, path, json=body, headers=headers)
        assert_not_found(response)
        assert tenant_b.name not in response.text

    assert event_log.position() == position
    assert snapshot(live, tenant_b) == before
    # B itself still reaches the same route: the 404 is about the tenant, not the id.
    owner_role = op.roles[0]
    if not op.is_command:
        own = read(live, key_of(tenant_b.owner, owner_role), path)
        assert own.status_code == 200, own.text


def test_a_forecast_of_another_tenants_scenario_is_not_found_and_appends_nothing(
    live: TestClient, event_log: EventLog, tenant_a: Tenant, tenant_b: Holdings
) -> None:
    before = snapshot(live, tenant_b)
    position = event_log.position()

    response = live.post(
        "/api/forecasts/generate",
        json={"scenarioId": tenant_b.ids["scenario"], "horizonMonths": 12, "paths": 100},
        headers=command_headers(tenant_a.writer),
    )

    assert_not_found(response)
    assert event_log.position() == position
    assert snapshot(live, tenant_b) == before


@pytest.mark.parametrize("op", IDLESS_READS)
def test_no_id_less_read_shows_another_tenants_rows(
    live: TestClient, tenant_a: Tenant, tenant_b: Holdings, op: apidoc.Operation
) -> None:
    query = "&".join(
        f"{p.name}={REQUIRED_QUERY[p.name]}" for p in op.params if p.where == "query" and p.required
    )
    if any(p.name == "limit" for p in op.params):
        query = "&".join(filter(None, (query, "limit=100")))
    path = f"{op.path}?{query}" if query else op.path

    for role in op.roles:
        response = read(live, key_of(tenant_a, role), path)
        assert response.status_code == 200, (role, response.text)
        for foreign in (*tenant_b.ids.values(), tenant_b.name):
            assert foreign not in response.text, (role, foreign)

    # B's own answer does show them where the route lists rows, so the check can bite.
    own = read(live, key_of(tenant_b.owner, op.roles[-1]), path).json()
    if isinstance(own, dict) and own.get("data"):
        assert tenant_b.ids["scenario"] in str(own["data"])


def valid_command_body(op: apidoc.Operation, tenant: Tenant, client: TestClient) -> Any:
    """A body ``op`` accepts from ``tenant``, and the path to send it to."""
    if op.operation_id == "createScenario":
        return scenario_body()
    if op.operation_id == "generateForecast":
        scenario = command(client, tenant.writer, "POST", "/api/scenarios", scenario_body())
        return {"scenarioId": scenario.json()["id"], "horizonMonths": 12}
    return dict(VALID_BODIES[op.operation_id])


@pytest.mark.parametrize("field", FORBIDDEN_FIELDS)
@pytest.mark.parametrize("op", [pytest.param(op, id=op.operation_id) for op in COMMANDS])
def test_a_body_naming_a_server_owned_field_is_refused_and_appends_nothing(
    live: TestClient,
    event_log: EventLog,
    tenant_a: Tenant,
    tenant_b: Holdings,
    op: apidoc.Operation,
    field: str,
) -> None:
    own = command(live, tenant_a.writer, "POST", "/api/scenarios", scenario_body())
    path = op.path.replace("{scenario_id}", own.json()["id"])
    body = valid_command_body(op, tenant_a, live)
    values = {
        "tenantId": tenant_b.ids["tenant"],
        "id": tenant_b.ids["scenario"],
        "version": 99,
        "status": "archived",
    }
    position = event_log.position()

    response = live.request(
        op.method,
        path,
        json={**body, field: values[field]},
        headers=command_headers(tenant_a.writer),
    )

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["requestId"] == response.headers["X-Request-Id"]
    assert f"`{field}`" in error["message"], error
    assert event_log.position() == position
    # Without the field the same body is accepted: the field alone was refused.
    accepted = live.request(op.method, path, json=body, headers=command_headers(tenant_a.writer))
    assert accepted.status_code < 300, accepted.text
