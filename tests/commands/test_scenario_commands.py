"""Scenario and forecast commands over HTTP, on both event-store backends."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from starlette.testclient import TestClient

from commands.context import Collaborators
from commands.tenants import revoke_key
from domain.receipt import CommandReceipt, receipt_id_for
from domain.scenario import Scenario
from infra.eventstore import EventLog
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body


def create(client: TestClient, tenant: Tenant, **overrides: Any) -> dict[str, Any]:
    response = client.post(
        "/api/scenarios", json=scenario_body(**overrides), headers=command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_created_scenario_is_answered_with_its_exact_state(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    response = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )

    assert response.status_code == 201
    body = response.json()
    assert body["type"] == "HIRING"
    assert body["status"] == "active"
    assert body["version"] == 1
    assert body["baseline"]["openingCash"] == "250000.00"
    assert body["baseline"]["monthlyCosts"] == "35000.50"
    assert body["assumptions"] == {
        "headcount": 2,
        "monthlyCostPerHead": "6500.00",
        "startOffsetMonths": 1,
    }
    assert response.headers["ETag"] == '"1"'
    assert response.headers["Location"] == f"/api/scenarios/{body['id']}"
    assert int(response.headers["X-Consistency-Token"]) == event_log.position()
    stored = event_log.find(uuid.UUID(body["id"]), Scenario)
    assert stored is not None and stored.tenant_id == tenant.tenant_id


def test_every_event_names_its_tenant_key_and_request(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    response = client.post(
        "/api/scenarios",
        json=scenario_body(),
        headers={**command_headers(tenant.writer), "X-Request-Id": "req-42"},
    )

    scenario_id = uuid.UUID(response.json()["id"])
    [event] = event_log.repository.event_store.get(scenario_id)
    assert event.tenant_id == tenant.tenant_id  # type: ignore[attr-defined]
    assert event.actor_id == str(tenant.writer_key_id)  # type: ignore[attr-defined]
    assert event.request_id == "req-42"  # type: ignore[attr-defined]
    assert response.headers["X-Request-Id"] == "req-42"


def test_replayed_command_has_no_second_effect(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    headers = command_headers(tenant.writer, "create-once")
    first = client.post("/api/scenarios", json=scenario_body(), headers=headers)
    position = event_log.position()

    again = client.post("/api/scenarios", json=scenario_body(), headers=headers)

    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["ETag"] == first.headers["ETag"]
    assert int(again.headers["X-Consistency-Token"]) >= int(first.headers["X-Consistency-Token"])
    assert event_log.position() == position


def test_replay_accepts_the_same_body_spelled_differently(
    client: TestClient, tenant: Tenant
) -> None:
    headers = command_headers(tenant.writer, "spelling")
    first = client.post("/api/scenarios", json=scenario_body(), headers=headers)
    body = scenario_body()
    body["baseline"]["openingCash"] = 250000  # the same money as "250000.00"
    reordered = dict(reversed(list(body.items())))
    text = " \n".join(__import__("json").dumps(reordered, indent=3).splitlines())

    again = client.post("/api/scenarios", content=text.encode(), headers=headers)

    assert again.status_code == 201
    assert again.content == first.content


def test_same_key_with_another_body_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    headers = command_headers(tenant.writer, "reused")
    client.post("/api/scenarios", json=scenario_body(), headers=headers)
    position = event_log.position()

    other = client.post("/api/scenarios", json=scenario_body(name="Other"), headers=headers)

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert event_log.position() == position


def test_same_key_on_another_route_is_refused(client: TestClient, tenant: Tenant) -> None:
    created = create(client, tenant)
    headers = command_headers(tenant.writer, "route-bound")
    client.post(f"/api/scenarios/{created['id']}/archive", json={}, headers=headers)

    other = client.patch(f"/api/scenarios/{created['id']}", json={}, headers=headers)

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"


def test_same_key_in_another_tenant_is_independent(
    client: TestClient, tenant: Tenant, operator: Collaborators
) -> None:
    other_tenant = make_tenant(operator, "Globex")
    first = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer, "shared")
    )

    second = client.post(
        "/api/scenarios",
        json=scenario_body(),
        headers=command_headers(other_tenant.writer, "shared"),
    )

    assert second.status_code == 201
    assert "Idempotent-Replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]


def test_rejected_command_stores_nothing_and_its_key_then_works(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    headers = command_headers(tenant.writer, "retry-me")
    position = event_log.position()
    bad = scenario_body(assumptions={"headcount": 0, "monthlyCostPerHead": "10"})

    rejected = client.post("/api/scenarios", json=bad, headers=headers)

    assert rejected.status_code == 400
    assert rejected.json()["error"]["details"][0]["pointer"] == "/assumptions/headcount"
    assert event_log.position() == position
    receipt_id = receipt_id_for(tenant.tenant_id, "retry-me")
    assert event_log.find(receipt_id, CommandReceipt) is None
    assert client.post("/api/scenarios", json=scenario_body(), headers=headers).status_code == 201


def test_patch_changes_only_what_is_sent_and_bumps_the_version(
    client: TestClient, tenant: Tenant
) -> None:
    created = create(client, tenant)

    response = client.patch(
        f"/api/scenarios/{created['id']}",
        json={"name": "Hire three", "assumptions": {"headcount": 3, "monthlyCostPerHead": 6500}},
        headers=command_headers(tenant.writer),
    )

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Hire three"
    assert body["assumptions"]["headcount"] == 3
    assert body["assumptions"]["startOffsetMonths"] == 0
    assert body["baseline"] == created["baseline"]
    assert body["version"] == 3  # renamed + assumptions changed
    assert response.headers["ETag"] == '"3"'


def test_patch_assumptions_are_validated_against_the_scenario_type(
    client: TestClient, tenant: Tenant
) -> None:
    created = create(client, tenant)

    response = client.patch(
        f"/api/scenarios/{created['id']}",
        json={"assumptions": {"percent": 10}},
        headers=command_headers(tenant.writer),
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_two_patches_with_the_same_if_match_one_wins_one_conflicts(
    client: TestClient, tenant: Tenant
) -> None:
    created = create(client, tenant)
    url = f"/api/scenarios/{created['id']}"
    headers = {**command_headers(tenant.writer), "If-Match": '"1"'}

    first = client.patch(url, json={"name": "A"}, headers=headers)
    second = client.patch(
        url, json={"name": "B"}, headers={**command_headers(tenant.writer), "If-Match": "1"}
    )

    assert first.status_code == 200
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "VERSION_CONFLICT"
    assert first.json()["version"] == 2


def test_archived_scenario_accepts_no_changes_and_no_forecasts(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    created = create(client, tenant)
    archived = client.post(
        f"/api/scenarios/{created['id']}/archive", headers=command_headers(tenant.writer)
    )
    assert archived.status_code == 200
    assert archived.json()["status"] == "archived"
    position = event_log.position()

    patch = client.patch(
        f"/api/scenarios/{created['id']}",
        json={"name": "Back"},
        headers=command_headers(tenant.writer),
    )
    again = client.post(
        f"/api/scenarios/{created['id']}/archive", json={}, headers=command_headers(tenant.writer)
    )
    forecast = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": created["id"], "horizonMonths": 12},
        headers=command_headers(tenant.writer),
    )

    for response in (patch, again, forecast):
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "SCENARIO_ARCHIVED"
    assert event_log.position() == position


def test_forecast_request_is_accepted_and_queued(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    created = create(client, tenant)

    response = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": created["id"], "horizonMonths": 24, "paths": 500},
        headers=command_headers(tenant.writer),
    )

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert int(response.headers["X-Consistency-Token"]) == event_log.position()
    [event] = event_log.repository.event_store.get(uuid.UUID(body["forecastId"]))
    assert type(event).__qualname__ == "Forecast.Requested"
    assert event.horizon_months == 24  # type: ignore[attr-defined]
    assert event.paths == 500  # type: ignore[attr-defined]


def test_another_tenants_scenario_is_not_found_for_every_command(
    client: TestClient, tenant: Tenant, operator: Collaborators, event_log: EventLog
) -> None:
    created = create(client, tenant)
    intruder = make_tenant(operator, "Intruder")
    position = event_log.position()
    headers = command_headers(intruder.writer)

    responses = [
        client.patch(f"/api/scenarios/{created['id']}", json={"name": "x"}, headers=headers),
        client.post(f"/api/scenarios/{created['id']}/archive", json={}, headers=headers),
        client.post(
            "/api/forecasts/generate",
            json={"scenarioId": created["id"], "horizonMonths": 12},
            headers=headers,
        ),
        client.patch(f"/api/scenarios/{uuid.uuid4()}", json={"name": "x"}, headers=headers),
        client.patch("/api/scenarios/not-a-uuid", json={"name": "x"}, headers=headers),
    ]

    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "NOT_FOUND"
    assert event_log.position() == position


def test_reader_and_auditor_keys_cannot_write(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    position = event_log.position()
    for key in (tenant.reader, tenant.auditor):
        response = client.post("/api/scenarios", json=scenario_body(), headers=command_headers(key))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "FORBIDDEN"
    assert event_log.position() == position


def test_missing_and_unknown_keys_are_unauthorized(client: TestClient) -> None:
    no_key = client.post("/api/scenarios", json=scenario_body(), headers={"Idempotency-Key": "a"})
    unknown = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers("abk_not-a-real-key")
    )
    assert no_key.status_code == 401
    assert no_key.headers["WWW-Authenticate"].startswith("Bearer")
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "UNAUTHORIZED"


def test_revoked_key_is_refused(
    settings: Any, event_log: EventLog, tenant: Tenant, operator: Collaborators
) -> None:
    from service.app import create_app

    # A zero TTL: the revocation is seen by the very next request.
    app = create_app(msgspec.structs.replace(settings, auth_cache_ttl_s=0.0), event_log=event_log)
    with TestClient(app) as client:
        assert create(client, tenant)["status"] == "active"
        revoke_key(operator, tenant.writer_key_id)
        response = client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
    assert response.status_code == 401
