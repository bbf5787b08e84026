"""The OpenAPI document at /openapi.json: valid OpenAPI 3.1, covering every route of the app
(the check that fails when a route is added without its operation), with the headers,
auth and errors of API.md, and agreeing with the running app on sample requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.settings import Settings
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body

Doc = dict[str, Any]
ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}
PUBLIC_PATHS = ("/health/live", "/health/ready", "/metrics", "/openapi.json")
COMMAND_METHODS = ("post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=str(tmp_path_factory.mktemp("data"))))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def doc(served: TestClient) -> Doc:
    response = served.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: Doc = response.json()
    return document


@pytest.fixture
def live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """API and projection workers in one process, so that reads see the commands."""
    with TestClient(create_app(settings, event_log=event_log, run_projections=True)) as client:
        yield client


def operations(doc: Doc) -> Iterator[tuple[str, str, Doc]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def locate(doc: Doc, operation_id: str) -> tuple[str, Doc]:
    [found] = [(p, op) for p, _, op in operations(doc) if op["operationId"] == operation_id]
    return found


def find(doc: Doc, operation_id: str) -> Doc:
    return locate(doc, operation_id)[1]


def param(operation: Doc, name: str) -> Doc:
    [found] = [p for p in operation["parameters"] if p["name"] == name]
    parameter: Doc = found
    return parameter


def validator(doc: Doc, schema: Doc) -> Any:
    """Validates instances against a schema of the document, its $refs resolved in it."""
    root = {**schema, "components": doc["components"]}
    return OAS31Validator(root, format_checker=OAS31Validator.FORMAT_CHECKER)


def body_schema(doc: Doc, operation_id: str) -> Doc:
    schema: Doc = find(doc, operation_id)["requestBody"]["content"]["application/json"]["schema"]
    return schema


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def settle(client: TestClient, response: httpx2.Response) -> None:
    token = int(response.headers["X-Consistency-Token"])
    assert client.app.state.projections.wait_for(token, 10.0)  # type: ignore[attr-defined]


def test_the_document_is_valid_openapi_3_1(doc: Doc) -> None:
    validate(doc)
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["paths"] and doc["components"]["schemas"]


def test_the_document_is_served_without_a_key_and_built_once_per_app(served: TestClient) -> None:
    first = served.get("/openapi.json")
    kept = served.app.state.openapi_document  # type: ignore[attr-defined]
    second = served.get("/openapi.json")

    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.content == second.content == kept
    assert served.app.state.openapi_document is kept  # type: ignore[attr-defined]


def test_every_route_of_the_app_is_documented_with_its_methods(doc: Doc, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=str(tmp_path)))
    missing = []
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r} is not a Route; document it and its routes"
        for method in sorted((route.methods or set()) - {"HEAD"}):
            if method.lower() not in doc["paths"].get(route.path, {}):
                missing.append(f"{method} {route.path}")
    assert not missing, f"routes without an operation in the OpenAPI document: {missing}"


def test_every_documented_operation_is_a_route_of_the_app(doc: Doc, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=str(tmp_path)))
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or set()
    }
    documented = {(path, method) for path, method, _ in operations(doc)}
    assert documented <= served


def test_operation_ids_are_unique(doc: Doc) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(doc)]
    assert len(ids) == len(set(ids))


def test_every_command_requires_an_idempotency_key_and_answers_a_consistency_token(
    doc: Doc,
) -> None:
    commands = [(p, op) for p, method, op in operations(doc) if method in COMMAND_METHODS]
    assert len(commands) == 4
    for path, operation in commands:
        key = param(operation, "Idempotency-Key")
        assert key["in"] == "header" and key["required"] is True, path
        assert key["schema"]["maxLength"] == 255, path
        [success] = [r for status, r in operation["responses"].items() if status.startswith("2")]
        assert success["headers"]["X-Consistency-Token"]["required"] is True, path


def test_a_patch_takes_an_optional_if_match(doc: Doc) -> None:
    patches = [op for _, method, op in operations(doc) if method == "patch"]
    assert patches
    for operation in patches:
        if_match = param(operation, "If-Match")
        assert if_match["in"] == "header" and if_match["required"] is False
        assert 409 in {int(status) for status in operation["responses"]}


def test_every_read_answers_its_projection_position(doc: Doc) -> None:
    reads = [op for path, method, op in operations(doc) if path.startswith("/api/")]
    reads = [op for op in reads if op["security"] and "Idempotency-Key" not in str(op)]
    # The six reads of any role and the five audit reads (auditor keys).
    assert len(reads) == 11
    for operation in reads:
        token = param(operation, "X-Consistency-Token")
        assert token["in"] == "header" and token["required"] is False
        assert "X-Projection-Position" in operation["responses"]["200"]["headers"]


def test_lists_take_paging_and_their_filters(doc: Doc) -> None:
    def query(operation_id: str) -> set[str]:
        operation = find(doc, operation_id)
        return {p["name"] for p in operation["parameters"] if p["in"] == "query"}

    assert query("getScenarios") == {"page", "limit", "cursor"}
    assert query("getForecasts") == {"page", "limit", "cursor", "scenarioId", "status"}
    assert query("getUsage") == {"month"}
    limit = param(find(doc, "getScenarios"), "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 100, 20)


def test_only_health_metrics_and_the_document_need_no_key(doc: Doc) -> None:
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, method, operation in operations(doc):
        public = path.startswith("/health/") or path in PUBLIC_PATHS
        if public:
            assert operation["security"] == [], f"{method} {path}"
        else:
            assert operation["security"] == [{"bearerAuth": []}], f"{method} {path}"
            assert "401" in operation["responses"], f"{method} {path}"


def test_every_error_answer_is_the_envelope(doc: Doc) -> None:
    for path, method, operation in operations(doc):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == ENVELOPE, f"{method} {path} {status}"
            if status == "503":
                assert "Retry-After" in response["headers"]
    assert set(find(doc, "createScenario")["responses"]) == {
        "201", "400", "401", "403", "409", "413", "415", "422", "503",
    }  # fmt: skip


def test_every_ref_resolves_to_a_component(doc: Doc) -> None:
    found = list(refs(doc))
    assert found
    for ref in found:
        assert ref.startswith("#/components/"), ref
        node: Any = doc
        for step in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and step in node, f"{ref} does not resolve"
            node = node[step]


def test_raw_fields_of_reads_have_their_documented_shape(doc: Doc) -> None:
    schemas = doc["components"]["schemas"]
    item = schemas["ScenarioItem"]["properties"]
    detail = schemas["ScenarioDetail"]["properties"]
    result = schemas["ForecastDetail"]["properties"]["result"]

    assert item["baseline"] == {"$ref": "#/components/schemas/Baseline"}
    assert len(item["assumptions"]["anyOf"]) == 5
    assert detail["latestForecasts"]["items"] == {"$ref": "#/components/schemas/ForecastSummary"}
    assert {"$ref": "#/components/schemas/ForecastResult"} in result["anyOf"]
    assert set(schemas["ForecastResult"]["required"]) == {
        "months", "revenue", "costs", "net", "cash", "bands",
        "runwayMonth", "probabilityCashNegative", "paths",
    }  # fmt: skip


def test_request_schemas_agree_with_the_app_on_sample_bodies(
    client: TestClient, tenant: Tenant, doc: Doc
) -> None:
    create = validator(doc, body_schema(doc, "createScenario"))
    baseline = scenario_body()["baseline"]
    samples = [
        scenario_body(),
        scenario_body(baseline={**baseline, "openingCash": 250000.5}),
        scenario_body(tenantId=str(tenant.tenant_id)),
        scenario_body(name=""),
        scenario_body(type="LOTTERY"),
        scenario_body(baseline={**baseline, "startMonth": "2026-13"}),
        {k: v for k, v in scenario_body().items() if k != "baseline"},
    ]
    created = ""
    for sample in samples:
        response = client.post(
            "/api/scenarios", json=sample, headers=command_headers(tenant.writer)
        )
        assert response.status_code in (201, 400), response.text
        assert (response.status_code == 201) == create.is_valid(sample), sample
        created = created or response.json()["id"]

    generate = validator(doc, body_schema(doc, "generateForecast"))
    for forecast in [
        {"scenarioId": created, "horizonMonths": 12},
        {"scenarioId": created, "horizonMonths": 12, "paths": 100},
        {"scenarioId": created, "horizonMonths": "12"},
        {"scenarioId": created, "horizonMonths": 121},
        {"scenarioId": created, "horizonMonths": 12, "paths": 0},
        {"scenarioId": "not-a-uuid", "horizonMonths": 12},
        {"scenarioId": created, "horizonMonths": 12, "status": "completed"},
    ]:
        response = client.post(
            "/api/forecasts/generate", json=forecast, headers=command_headers(tenant.writer)
        )
        assert response.status_code in (202, 400), response.text
        assert (response.status_code == 202) == generate.is_valid(forecast), forecast


def test_the_idempotency_key_schema_agrees_with_the_app(
    client: TestClient, tenant: Tenant, doc: Doc
) -> None:
    schema = param(find(doc, "createScenario"), "Idempotency-Key")["schema"]
    check = validator(doc, schema)
    for key in ["k", "order 42 / retry", "~" * 255, "a" * 256, "   ", "tab\tkey"]:
        headers = command_headers(tenant.writer, key)
        response = client.post("/api/scenarios", json=scenario_body(), headers=headers)
        assert response.status_code in (201, 400), response.text
        assert (response.status_code == 201) == check.is_valid(key), key


def test_answers_carry_their_documented_headers_and_match_their_schemas(
    live: TestClient, tenant: Tenant, doc: Doc
) -> None:
    created = live.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    scenario_id = created.json()["id"]
    queued = live.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, "horizonMonths": 6, "paths": 50},
        headers=command_headers(tenant.writer),
    )
    settle(live, queued)
    forecast_id = queued.json()["forecastId"]
    commands = {"createScenario": created, "generateForecast": queued}
    reads = ["getScenarios", "getScenario", "getForecasts", "getForecast", "getDashboard"]

    for operation_id in [*commands, *reads, "getUsage"]:
        path, operation = locate(doc, operation_id)
        url = path.replace("{scenario_id}", scenario_id).replace("{forecast_id}", forecast_id)
        response = commands.get(operation_id) or live.get(
            url, headers={"Authorization": f"Bearer {tenant.reader}"}
        )
        [(status, documented)] = [
            (s, r) for s, r in operation["responses"].items() if s.startswith("2")
        ]
        assert response.status_code == int(status), f"{operation_id}: {response.text}"
        for name, header in documented["headers"].items():
            if header.get("required"):
                assert name in response.headers, f"{operation_id} answers no {name}"
        schema = documented["content"]["application/json"]["schema"]
        errors = [e.message for e in validator(doc, schema).iter_errors(response.json())]
        assert not errors, f"{operation_id}: {errors}"
