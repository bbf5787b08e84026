"""Liveness and readiness on both backends: ready is ok normally, degraded (200, with the
X-Service-Status headers) when read models lag or the forecast queue is nearly full, and
503 SERVICE_UNAVAILABLE when PostgreSQL is gone, while liveness still answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body
from tests.services import ADMIN_URL, postgres_database

SETTLE_S = 10.0


def settle(client: TestClient, event_log: EventLog) -> None:
    runner = client.app.state.projections  # type: ignore[attr-defined]
    assert runner.wait_for(event_log.position(), SETTLE_S)


def test_ready_is_ok_on_a_healthy_service(client: TestClient) -> None:
    response = client.get("/health/ready", headers={"X-Request-Id": "ready-1"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["projectionLag"]["status"] == "ok"
    assert body["checks"]["forecastQueue"] == {"status": "ok", "value": 0, "threshold": 80}
    assert "X-Service-Status" not in response.headers
    assert response.headers["X-Request-Id"] == "ready-1"
    assert client.get("/health/live").json() == {"status": "ok"}


def test_ready_is_degraded_while_read_models_trail_the_log(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    strict = msgspec.structs.replace(settings, max_projection_lag_events=0)
    # No projection workers: the tenant's events stay unapplied.
    with TestClient(create_app(strict, event_log=event_log)) as client:
        response = client.get("/health/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "degraded"
    lag = body["checks"]["projectionLag"]
    assert lag["status"] == "degraded"
    assert lag["value"] == event_log.position() > 0
    assert lag["threshold"] == 0
    assert body["checks"]["database"] == {"status": "ok"}
    assert response.headers["X-Service-Status"] == "degraded"
    assert "projectionLag" in response.headers["X-Service-Message"]


def test_while_degraded_every_response_says_so_and_stops_once_recovered(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    """Not only /health/ready: reads, commands and errors carry the headers too, from the
    process's background checks, and lose them once the read models caught up."""
    strict = msgspec.structs.replace(settings, max_projection_lag_events=0, status_refresh_s=0.05)
    app = create_app(strict, event_log=event_log, run_projections=True, run_jobs=False)
    reader = {"Authorization": f"Bearer {tenant.reader}"}
    with TestClient(app) as client:
        settle(client, event_log)
        # The projections run here, so lag comes only while events are unapplied: stop them.
        client.app.state.projections.stop()  # type: ignore[attr-defined]
        created = client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
        assert created.status_code == 201

        def marked() -> list[str]:
            answers = [
                client.get("/api/dashboard", headers=reader),
                client.get("/api/scenarios/not-an-id", headers=reader),
                client.get("/api/dashboard"),
                client.get("/health/live"),
            ]
            return [a.headers.get("X-Service-Status", "") for a in answers]

        deadline = time.monotonic() + SETTLE_S
        while marked() != ["degraded"] * 4:
            assert time.monotonic() < deadline, marked()
            time.sleep(0.05)
        answer = client.get("/api/dashboard", headers=reader)
        assert "projectionLag" in answer.headers["X-Service-Message"]

    # A fresh process whose projections catch up is not degraded.
    with TestClient(
        create_app(strict, event_log=event_log, run_projections=True, run_jobs=False)
    ) as client:
        settle(client, event_log)
        deadline = time.monotonic() + SETTLE_S
        while "X-Service-Status" in client.get("/api/dashboard", headers=reader).headers:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_ready_is_ok_again_once_the_projections_caught_up(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    strict = msgspec.structs.replace(settings, max_projection_lag_events=0)
    app = create_app(strict, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        settle(client, event_log)
        # Readiness runs are shared (the background refresher's run in flight answers a
        # poll too), so one started before the projections caught up may answer first.
        deadline = time.monotonic() + SETTLE_S
        response = client.get("/health/ready")
        while response.json().get("status") != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
            response = client.get("/health/ready")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok", response.text
    assert response.json()["checks"]["projectionLag"] == {
        "status": "ok",
        "value": 0,
        "threshold": 0,
    }


def test_ready_is_degraded_when_the_forecast_queue_is_over_80_percent(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    small = msgspec.structs.replace(settings, forecast_queue_limit=2)
    # Without job workers forecasts stay queued; the threshold is 80 % of 2, rounded down
    # to 1, and two queued forecasts are over it.
    app = create_app(small, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        created = client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
        assert created.status_code == 201, created.text
        for _ in range(2):
            queued = client.post(
                "/api/forecasts/generate",
                json={"scenarioId": created.json()["id"], "horizonMonths": 12, "paths": 100},
                headers=command_headers(tenant.writer),
            )
            assert queued.status_code == 202, queued.text
        settle(client, event_log)
        response = client.get("/health/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["forecastQueue"]["status"] == "degraded"
    assert body["checks"]["forecastQueue"]["value"] == 2
    assert body["checks"]["forecastQueue"]["threshold"] == 1
    assert response.headers["X-Service-Status"] == "degraded"
    assert "forecastQueue" in response.headers["X-Service-Message"]


@pytest.fixture
def doomed_postgres() -> Iterator[tuple[str, Settings]]:
    """A PostgreSQL database of its own, which the test drops while the app runs."""
    with postgres_database() as url:
        params = psycopg.conninfo.conninfo_to_dict(url)
        yield (
            str(params["dbname"]),
            Settings(database_url=url, health_timeout_s=1.0, db_pool_timeout_s=1.0),
        )


def test_ready_answers_503_when_postgres_is_gone_and_live_still_answers(
    doomed_postgres: tuple[str, Settings], tmp_path: Path
) -> None:
    name, settings = doomed_postgres
    settings = msgspec.structs.replace(settings, data_dir=str(tmp_path))
    log = open_event_log(settings)
    try:
        make_tenant(Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4))
        with TestClient(create_app(settings, event_log=log)) as client:
            assert client.get("/health/ready").status_code == 200
            with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

            ready = client.get("/health/ready", headers={"X-Request-Id": "down-1"})
            live = client.get("/health/live")
    finally:
        log.close()

    assert ready.status_code == 503, ready.text
    error = ready.json()["error"]
    assert error["code"] == "SERVICE_UNAVAILABLE"
    assert error["requestId"] == "down-1"
    assert ready.headers["Retry-After"] == "1"
    assert live.status_code == 200 and live.json() == {"status": "ok"}
