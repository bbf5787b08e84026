"""Forecast generation in the embedded process, on both backends: a request goes from
queued to completed through the dispatcher, the in-process broker and the job, and every
read shows it; a forecast over its time limit fails with TIMEOUT and frees its place;
a full queue refuses with 503 QUEUE_FULL, appends nothing, and the same Idempotency-Key
succeeds once there is room. Every wait is bounded."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import msgspec
from starlette.testclient import TestClient

from commands.context import Collaborators
from commands.forecast_jobs import JobDeps, generate_forecast
from domain.events import Actor
from domain.forecast import ERROR, TIMEOUT, Forecast
from infra.clock import utc_now
from infra.eventstore import EventLog
from infra.settings import Settings
from projections.runner import ProjectionRunner
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body

# The bound of every single wait: a stuck job or projection fails the test, never hangs it.
DEADLINE_S = 60.0
POLL_S = 0.02
HORIZON = 12
PATHS = 500


@dataclass(frozen=True)
class Service:
    """The HTTP client and the projection workers whose positions reads wait on."""

    client: TestClient
    projections: ProjectionRunner

    def settle(self, position: int) -> None:
        reached = self.projections.wait_for(position, DEADLINE_S)
        assert reached, f"the projections did not reach {position} in {DEADLINE_S}s"

    def settled(self, response: httpx2.Response) -> httpx2.Response:
        self.settle(int(response.headers["X-Consistency-Token"]))
        return response

    def read(self, key: str, path: str) -> dict[str, Any]:
        response = self.client.get(path, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def create_scenario(self, tenant: Tenant) -> str:
        response = self.client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
        assert response.status_code == 201, response.text
        scenario_id: str = self.settled(response).json()["id"]
        return scenario_id

    def generate(
        self,
        tenant: Tenant,
        scenario_id: str,
        *,
        horizon: int = HORIZON,
        paths: int = PATHS,
        idempotency_key: str | None = None,
    ) -> httpx2.Response:
        return self.client.post(
            "/api/forecasts/generate",
            json={"scenarioId": scenario_id, "horizonMonths": horizon, "paths": paths},
            headers=command_headers(tenant.writer, idempotency_key),
        )

    def accepted(self, response: httpx2.Response) -> str:
        assert response.status_code == 202, response.text
        forecast_id: str = self.settled(response).json()["forecastId"]
        return forecast_id


@contextmanager
def embedded(settings: Settings, event_log: EventLog) -> Iterator[Service]:
    """The embedded process: API, projections, dispatcher and in-process job workers."""
    app = create_app(settings, event_log=event_log, run_projections=True)
    with TestClient(app) as client:
        yield Service(client, app.state.projections)


@contextmanager
def without_workers(settings: Settings, event_log: EventLog) -> Iterator[Service]:
    """The API with the read models maintained (the queue's among them) but no dispatcher
    and no job workers: requested forecasts stay queued."""
    runner = wiring.projection_runner(settings, event_log, broker=None)
    runner.start()
    try:
        with TestClient(create_app(settings, event_log=event_log)) as client:
            yield Service(client, runner)
    finally:
        runner.stop()


def finished(log: EventLog, forecast_id: str) -> Forecast:
    """The forecast once its job recorded an outcome (bounded)."""
    deadline = time.monotonic() + DEADLINE_S
    pause = threading.Event()
    while True:
        forecast = log.find(uuid.UUID(forecast_id), Forecast)
        assert forecast is not None, f"forecast {forecast_id} is not in the log"
        if forecast.finished:
            return forecast
        assert time.monotonic() < deadline, f"forecast {forecast_id} still {forecast.status}"
        pause.wait(POLL_S)


def history(log: EventLog, forecast_id: str) -> list[str]:
    """The names of the forecast's events in order (Requested, Started, ...)."""
    stored = log.recorder.select_events(uuid.UUID(forecast_id))
    return [type(log.mapper.to_domain_event(s)).__name__ for s in stored]


def test_requested_forecast_completes_and_every_read_shows_its_result(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    with embedded(settings, event_log) as service:
        scenario_id = service.create_scenario(tenant)
        response = service.generate(tenant, scenario_id)
        assert response.json() == {"forecastId": response.json()["forecastId"], "status": "queued"}
        forecast_id = service.accepted(response)
        assert response.headers["Location"] == f"/api/forecasts/{forecast_id}"

        assert finished(event_log, forecast_id).status == "completed"
        service.settle(event_log.position())
        forecast = service.read(tenant.reader, f"/api/forecasts/{forecast_id}")
        detail = service.read(tenant.reader, f"/api/scenarios/{scenario_id}")
        completed = service.read(tenant.reader, "/api/forecasts?status=completed")
        dashboard = service.read(tenant.reader, "/api/dashboard")
        usage = service.read(tenant.reader, "/api/usage")

    assert forecast["status"] == "completed"
    assert forecast["completedAt"] is not None
    assert forecast["failureReason"] is None
    assert (forecast["horizonMonths"], forecast["paths"]) == (HORIZON, PATHS)
    result = forecast["result"]
    assert set(result) == {
        "months",
        "revenue",
        "costs",
        "net",
        "cash",
        "bands",
        "runwayMonth",
        "probabilityCashNegative",
        "paths",
    }
    assert result["months"] == [f"2026-{m:02d}" for m in range(1, HORIZON + 1)]
    for name in ("revenue", "costs", "net", "cash"):
        assert len(result[name]) == HORIZON, name
        assert all(round(v, 2) == v for v in result[name]), f"{name} is not rounded to cents"
    for name in ("revenue", "cash"):
        bands = result["bands"][name]
        assert set(bands) == {"p10", "p50", "p90"}
        assert all(len(bands[p]) == HORIZON for p in bands), name
        assert all(lo <= mid <= hi for lo, mid, hi in zip(*bands.values(), strict=True)), name
    # Month 1 is the baseline (the hiring starts after month 1): revenue 40000, costs
    # 35000.50, and cash is the opening cash plus that month's net.
    assert (result["revenue"][0], result["costs"][0], result["net"][0]) == (40000, 35000.5, 4999.5)
    assert result["cash"][0] == 254999.5
    assert result["runwayMonth"] is None or result["runwayMonth"] in result["months"]
    assert 0.0 <= result["probabilityCashNegative"] <= 1.0
    assert result["paths"] == PATHS
    [summary] = detail["latestForecasts"]
    assert (summary["id"], summary["status"]) == (forecast_id, "completed")
    assert summary["completedAt"] is not None
    assert [f["id"] for f in completed["data"]] == [forecast_id]
    assert dashboard["forecasts"] == {
        "total": 1,
        "queued": 0,
        "running": 0,
        "completed": 1,
        "failed": 0,
    }
    assert usage["forecastsRequested"] == 1
    assert usage["forecastsCompleted"] == 1
    assert usage["computeSeconds"] > 0
    assert history(event_log, forecast_id) == ["Requested", "Started", "Completed"]


def test_a_completed_forecast_sent_to_the_job_again_appends_nothing(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    with embedded(settings, event_log) as service:
        forecast_id = service.accepted(service.generate(tenant, service.create_scenario(tenant)))
        finished(event_log, forecast_id)
        before = event_log.position()

        deps = JobDeps(log=event_log, clock=utc_now, timeout_s=settings.forecast_timeout_s)
        generate_forecast(deps, forecast_id, "redelivered")
        generate_forecast(deps, forecast_id, "redelivered-again")

        assert event_log.position() == before
        assert Counter(history(event_log, forecast_id))["Completed"] == 1


def test_forecast_over_its_time_limit_fails_with_timeout_and_frees_its_place(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    limited = msgspec.structs.replace(settings, forecast_timeout_s=0.001, forecast_tenant_limit=1)
    with embedded(limited, event_log) as service:
        scenario_id = service.create_scenario(tenant)
        first = service.accepted(service.generate(tenant, scenario_id, horizon=120, paths=100_000))

        failed = finished(event_log, first)
        service.settle(event_log.position())
        forecast = service.read(tenant.reader, f"/api/forecasts/{first}")
        dashboard = service.read(tenant.reader, "/api/dashboard")
        # Its place in the tenant's queue (limit 1) is free again.
        second = service.accepted(service.generate(tenant, scenario_id, horizon=120, paths=100_000))
        finished(event_log, second)

    assert (failed.status, failed.failure_reason) == ("failed", TIMEOUT)
    assert forecast["status"] == "failed"
    assert forecast["failureReason"] == TIMEOUT
    assert forecast["result"] is None
    assert forecast["completedAt"] is not None
    assert dashboard["forecasts"]["failed"] == 1
    assert dashboard["forecasts"]["queued"] + dashboard["forecasts"]["running"] == 0
    assert history(event_log, first) == ["Requested", "Started", "Failed"]


def test_full_queue_refuses_with_503_and_the_same_key_succeeds_once_there_is_room(
    settings: Settings, event_log: EventLog, tenant: Tenant, operator: Collaborators
) -> None:
    limited = msgspec.structs.replace(settings, forecast_tenant_limit=2)
    other = make_tenant(operator, "Other")
    with without_workers(limited, event_log) as service:
        scenario_id = service.create_scenario(tenant)
        queued = [service.accepted(service.generate(tenant, scenario_id)) for _ in range(2)]
        before = event_log.position()
        key = uuid.uuid4().hex

        refused = service.generate(tenant, scenario_id, idempotency_key=key)
        refused_again = service.generate(tenant, scenario_id, idempotency_key=key)
        after_refusals = event_log.position()
        # The limit is per tenant: another tenant is still admitted.
        service.accepted(service.generate(other, service.create_scenario(other)))

        waiting = event_log.find(uuid.UUID(queued[0]), Forecast)
        assert waiting is not None
        operator_actor = Actor(tenant_id=tenant.tenant_id, actor_id="test", request_id="test")
        waiting.fail(operator_actor, reason=ERROR, message="made room", at=utc_now())
        service.settle(event_log.save(waiting)[-1].notification.id)
        admitted = service.generate(tenant, scenario_id, idempotency_key=key)
        replayed = service.generate(tenant, scenario_id, idempotency_key=key)

    for response in (refused, refused_again):
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"].isdigit()
        assert response.json() == {
            "error": {
                "code": "QUEUE_FULL",
                "message": "Forecast queue is full. Please try again later.",
                "requestId": response.headers["X-Request-Id"],
                "operation": "forecast_generation",
            }
        }
        assert "X-Consistency-Token" not in response.headers
    assert after_refusals == before, "a refused request appended events"
    assert admitted.status_code == 202, admitted.text
    assert "Idempotent-Replayed" not in admitted.headers
    assert admitted.json()["forecastId"] not in queued
    assert replayed.status_code == 202
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json() == admitted.json()
