"""Fixtures: the same behaviour tests run on both event-store backends (SQLite files and
PostgreSQL), arranged through public entry points (the CLI's commands, the HTTP API)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from commands import tenants
from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from service.app import create_app
from tests.services import postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield Settings(data_dir=str(tmp_path / "data"))
        return
    with postgres_database() as url:
        yield Settings(database_url=url, data_dir=str(tmp_path / "data"))


@pytest.fixture
def postgres_settings(tmp_path: Path) -> Iterator[Settings]:
    """For the tests that need PostgreSQL itself (its locks, its processes)."""
    with postgres_database() as url:
        yield Settings(database_url=url, data_dir=str(tmp_path / "data"))


@pytest.fixture
def event_log(settings: Settings) -> Iterator[EventLog]:
    log = open_event_log(settings)
    yield log
    log.close()


@pytest.fixture
def operator(event_log: EventLog) -> Collaborators:
    """The operator's collaborators, as the CLI builds them."""
    return Collaborators(log=event_log, clock=utc_now, new_id=uuid.uuid4)


@dataclass(frozen=True)
class Tenant:
    tenant_id: uuid.UUID
    writer: str
    reader: str
    auditor: str
    writer_key_id: uuid.UUID


def make_tenant(operator: Collaborators, name: str = "Acme") -> Tenant:
    created = tenants.create_tenant(operator, name)
    keys = {
        role: tenants.issue_key(operator, created.tenant_id, role)
        for role in ("writer", "reader", "auditor")
    }
    return Tenant(
        tenant_id=created.tenant_id,
        writer=keys["writer"].key,
        reader=keys["reader"].key,
        auditor=keys["auditor"].key,
        writer_key_id=keys["writer"].key_id,
    )


@pytest.fixture
def tenant(operator: Collaborators) -> Tenant:
    return make_tenant(operator)


@pytest.fixture
def client(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    with TestClient(create_app(settings, event_log=event_log)) as test_client:
        yield test_client


def scenario_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Hire two engineers",
        "type": "HIRING",
        "baseline": {
            "startMonth": "2026-01",
            "openingCash": "250000.00",
            "monthlyRevenue": "40000",
            "monthlyCosts": 35000.5,
            "revenueGrowthRate": 0.02,
            "costGrowthRate": 0.01,
        },
        "assumptions": {"headcount": 2, "monthlyCostPerHead": "6500", "startOffsetMonths": 1},
    }
    body.update(overrides)
    return body


def command_headers(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    headers["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
    return headers
