"""Read-your-writes, on both backends: a read sent with a command's X-Consistency-Token
waits (bounded) until its projection has reached that position, answers 503
OPERATION_TIMEOUT (operation read_your_writes) past the bound, refuses a malformed token
and one beyond the log's head (never issued), and without the header costs nothing more
than before."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx2
import msgspec
import pytest
from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.settings import Settings
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body

CONSISTENCY = "X-Consistency-Token"
POSITION = "X-Projection-Position"


def read(client: TestClient, key: str, path: str, token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if token is not None:
        headers[CONSISTENCY] = token
    return client.get(path, headers=headers)


def write_scenario_and_forecast(client: TestClient, tenant: Tenant) -> tuple[str, str, str]:
    """Creates a scenario and requests its forecast: their ids and the last token."""
    created = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert created.status_code == 201, created.text
    scenario_id: str = created.json()["id"]
    requested = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, "horizonMonths": 12, "paths": 100},
        headers=command_headers(tenant.writer),
    )
    assert requested.status_code == 202, requested.text
    forecast_id: str = requested.json()["forecastId"]
    token = requested.headers[CONSISTENCY]
    assert int(token) >= int(created.headers[CONSISTENCY])
    return scenario_id, forecast_id, token


def every_read(scenario_id: str, forecast_id: str) -> list[str]:
    return [
        "/api/scenarios",
        f"/api/scenarios/{scenario_id}",
        "/api/forecasts",
        f"/api/forecasts/{forecast_id}",
        "/api/dashboard",
        "/api/usage",
    ]


@pytest.fixture
def without_projections(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """An API process whose read models nobody is projecting (yet)."""
    with TestClient(create_app(settings, event_log=event_log)) as client:
        yield client


def test_a_read_with_the_token_waits_for_the_projection(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    patient = msgspec.structs.replace(settings, read_your_writes_timeout_s=10.0)
    with TestClient(create_app(patient, event_log=event_log)) as client:
        scenario_id, forecast_id, token = write_scenario_and_forecast(client, tenant)
        # Nothing projects yet: without the token the read does not see the write.
        assert read(client, tenant.reader, f"/api/scenarios/{scenario_id}").status_code == 404

        runner = wiring.projection_runner(patient, event_log)
        # The projections start only after the read below is sent and waiting.
        starter = threading.Timer(0.2, runner.start)
        starter.start()
        try:
            started = time.monotonic()
            detail = read(client, tenant.reader, f"/api/scenarios/{scenario_id}", token)
            waited = time.monotonic() - started
            reads = {
                path: read(client, tenant.reader, path, token)
                for path in every_read(scenario_id, forecast_id)
            }
        finally:
            starter.join()
            runner.stop()

    assert detail.status_code == 200, detail.text
    assert detail.json()["id"] == scenario_id
    assert int(detail.headers[POSITION]) >= int(token)
    # It waited for the projections (started 0.2 s in) rather than answering 404.
    assert 0.1 <= waited < 10.0
    for path, response in reads.items():
        assert response.status_code == 200, (path, response.text)
        assert int(response.headers[POSITION]) >= int(token), path
    assert reads["/api/scenarios"].json()["data"][0]["id"] == scenario_id
    assert reads["/api/forecasts"].json()["data"][0]["id"] == forecast_id
    assert reads[f"/api/forecasts/{forecast_id}"].json()["status"] == "queued"
    assert reads["/api/dashboard"].json()["forecasts"]["queued"] == 1
    assert reads["/api/usage"].json()["forecastsRequested"] == 1


def test_a_read_past_the_bound_answers_503(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    hasty = msgspec.structs.replace(settings, read_your_writes_timeout_s=0.2)
    with TestClient(create_app(hasty, event_log=event_log)) as client:
        scenario_id, forecast_id, token = write_scenario_and_forecast(client, tenant)
        for path in every_read(scenario_id, forecast_id):
            started = time.monotonic()
            response = read(client, tenant.reader, path, token)
            took = time.monotonic() - started

            assert response.status_code == 503, (path, response.text)
            error = response.json()["error"]
            assert error["code"] == "OPERATION_TIMEOUT"
            assert error["operation"] == "read_your_writes"
            assert int(response.headers["Retry-After"]) >= 1
            assert 0.2 <= took < 1.2, (path, took)


@pytest.mark.parametrize("token", ["abc", "-1", "1.5", "1e3", "0x10", "+1", "1_000", "", "9" * 19])
def test_a_malformed_token_is_400(
    without_projections: TestClient, tenant: Tenant, token: str
) -> None:
    for path in ("/api/scenarios", "/api/dashboard", "/api/usage"):
        response = read(without_projections, tenant.reader, path, token)

        assert response.status_code == 400, (path, token, response.text)
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_a_token_beyond_the_logs_head_is_400_at_once(
    without_projections: TestClient, tenant: Tenant
) -> None:
    # No command was ever acknowledged there: waiting could only end in a 503.
    scenario_id, forecast_id, token = write_scenario_and_forecast(without_projections, tenant)
    beyond = str(int(token) + 1_000)
    for path in every_read(scenario_id, forecast_id):
        started = time.monotonic()
        response = read(without_projections, tenant.reader, path, beyond)

        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert beyond in error["message"]
        assert time.monotonic() - started < 1.0, path


def test_without_the_header_nothing_changes(
    without_projections: TestClient, tenant: Tenant
) -> None:
    scenario_id, forecast_id, _ = write_scenario_and_forecast(without_projections, tenant)
    for path in every_read(scenario_id, forecast_id):
        started = time.monotonic()
        response = read(without_projections, tenant.reader, path)

        # Not projected, and not waited for: the read answers what is there, at once.
        assert time.monotonic() - started < 1.0
        assert response.status_code in (200, 404), (path, response.text)
        if response.status_code == 200:
            assert response.headers[POSITION] == "0"


def test_the_token_costs_one_cheap_statement_when_already_reached(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    # Uncached, so every read reaches the database (the cache spares even these).
    uncached = msgspec.structs.replace(settings, cache_enabled=False)
    app = create_app(uncached, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as live:
        scenario_id, forecast_id, token = write_scenario_and_forecast(live, tenant)
        assert live.app.state.projections.wait_for(int(token), 10.0)  # type: ignore[attr-defined]
        store = live.app.state.read_api.store  # type: ignore[attr-defined]
        statements: list[str] = []
        store.on_statement = statements.append
        try:
            for path in every_read(scenario_id, forecast_id):
                statements.clear()
                plain = read(live, tenant.reader, path)
                assert plain.status_code == 200, plain.text
                assert len(statements) == 1, (path, statements)

                statements.clear()
                consistent = read(live, tenant.reader, path, token)
                assert consistent.status_code == 200, consistent.text
                assert len(statements) == 2, (path, statements)
                assert consistent.content == plain.content

                statements.clear()
                assert read(live, tenant.reader, path, "0").status_code == 200
                assert len(statements) == 1, (path, statements)
        finally:
            store.on_statement = None
