"""JSON logs on both backends: one object per line, the access line of each request with
its request id, tenant and key id (once authenticated), route template, method, status
and duration; an unexpected error logged with the request id of its answer; a real
`accubooks api` process writing only JSON lines; and never an API key, in any of them."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.settings import Settings
from service import logs
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.service.processes import api_process

# Shaped like a real key, but never issued: refused, and never logged either.
UNKNOWN_KEY = "abk_" + "x" * 40


class Captured:
    """What the process's loggers wrote, as configure_logging writes it."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.text.splitlines() if line]
        assert all(isinstance(line, dict) for line in parsed)
        return parsed

    def access(self, request_id: str) -> dict[str, Any]:
        [line] = [
            line
            for line in self.lines()
            if line["logger"] == "accubooks.access" and line.get("request_id") == request_id
        ]
        return line


@pytest.fixture
def captured() -> Iterator[Captured]:
    root = logging.getLogger()
    level = root.level
    found = Captured()
    handler = logs.configure_logging(logging.INFO, found.stream)
    try:
        yield found
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_access_lines_carry_request_id_tenant_route_and_status_never_the_key(
    client: TestClient, tenant: Tenant, captured: Captured
) -> None:
    created = client.post(
        "/api/scenarios",
        json=scenario_body(),
        headers={**command_headers(tenant.writer), "X-Request-Id": "log-create-1"},
    )
    assert created.status_code == 201, created.text
    scenario_id = created.json()["id"]
    reader = {"Authorization": f"Bearer {tenant.reader}"}
    responses = [
        client.get(f"/api/scenarios/{uuid.uuid4()}", headers={**reader, "X-Request-Id": "log-404"}),
        client.get("/api/scenarios", headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}),
        client.get("/health/live", headers={"X-Request-Id": "log-live"}),
    ]
    assert [r.status_code for r in responses] == [404, 401, 200]

    line = captured.access("log-create-1")
    assert line["level"] == "INFO"
    assert line["timestamp"].endswith("Z")
    assert line["tenant_id"] == str(tenant.tenant_id)
    assert line["key_id"] == str(tenant.writer_key_id)
    assert (line["method"], line["route"], line["status"]) == ("POST", "/api/scenarios", 201)
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["message"] == "POST /api/scenarios 201"

    missing = captured.access("log-404")
    assert missing["tenant_id"] == str(tenant.tenant_id)
    assert (missing["route"], missing["status"]) == ("/api/scenarios/{scenario_id}", 404)
    assert scenario_id not in captured.text
    refused = captured.access(responses[1].headers["X-Request-Id"])
    assert refused["status"] == 401
    assert "tenant_id" not in refused and "key_id" not in refused
    live = captured.access("log-live")
    assert (live["route"], live["status"]) == ("/health/live", 200)
    assert "tenant_id" not in live

    for key in (tenant.writer, tenant.reader, UNKNOWN_KEY):
        assert key not in captured.text
    assert "Bearer" not in captured.text
    assert "authorization" not in captured.text.lower()


def test_an_unexpected_error_is_logged_with_the_request_id_of_its_answer(
    settings: Settings, event_log: EventLog, tenant: Tenant, captured: Captured
) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("the test broke this route")

    app = create_app(settings, event_log=event_log)
    app.add_route("/broken", broken, methods=["GET"])
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(
            "/broken",
            headers={"X-Request-Id": "boom-1", "Authorization": f"Bearer {tenant.writer}"},
        )

    assert response.status_code == 500
    assert response.json()["error"]["requestId"] == "boom-1"
    [error] = [line for line in captured.lines() if line["logger"] == "accubooks.errors"]
    assert error["level"] == "ERROR"
    assert error["request_id"] == "boom-1"
    assert "RuntimeError: the test broke this route" in error["exception"]
    access = captured.access("boom-1")
    assert (access["route"], access["status"]) == ("/broken", 500)
    assert tenant.writer not in captured.text


def test_an_api_process_writes_only_json_lines_and_never_a_key(
    settings: Settings, tenant: Tenant, tmp_path: Path
) -> None:
    log_path = tmp_path / "api.log"
    with api_process(settings, log_path) as api, httpx2.Client(base_url=api.url) as http:
        created = http.post(
            "/api/scenarios",
            json=scenario_body(),
            headers={**command_headers(tenant.writer), "X-Request-Id": "process-create"},
        )
        read = http.get(
            "/api/dashboard",
            headers={"Authorization": f"Bearer {tenant.reader}", "X-Request-Id": "process-read"},
        )
        refused = http.get(
            "/api/dashboard",
            headers={"Authorization": f"Bearer {UNKNOWN_KEY}", "X-Request-Id": "process-401"},
        )
    assert (created.status_code, read.status_code, refused.status_code) == (201, 200, 401)

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "accubooks.access"]
    by_request = {line["request_id"]: line for line in access}
    assert by_request["process-create"]["tenant_id"] == str(tenant.tenant_id)
    assert by_request["process-create"]["key_id"] == str(tenant.writer_key_id)
    assert by_request["process-create"]["route"] == "/api/scenarios"
    assert by_request["process-create"]["status"] == 201
    assert by_request["process-read"]["tenant_id"] == str(tenant.tenant_id)
    assert (by_request["process-read"]["route"], by_request["process-read"]["status"]) == (
        "/api/dashboard",
        200,
    )
    assert by_request["process-401"]["status"] == 401
    for key in (tenant.writer, tenant.reader, UNKNOWN_KEY):
        assert key not in text
