"""Tenancy in depth on PostgreSQL: the API reads tenants' read models as a role row-level
security binds (made by `accubooks reader-role`, READ_DATABASE_URL), with the tenant set
per transaction. The application's own tenant filter is then no longer the only thing
between a tenant and another's rows: a read with that filter removed still sees only the
acting tenant's rows, and a read outside any tenant sees none.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra import readstore
from infra.eventstore import EventLog
from infra.readstore import ReadStore
from infra.settings import Settings
from projections import rebuild as rebuilder
from projections.readmodel import tenant_tables
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, make_tenant
from tests.projections.test_rebuild import (
    accubooks,  # noqa: F401 (a fixture)
    some_commands,
)
from tests.readapi.test_reads import read

pytestmark = pytest.mark.parametrize("settings", ["postgres"], indirect=True)


@pytest.fixture
def reader_url(
    settings: Settings,
    accubooks: Any,  # noqa: F811 (the fixture)
) -> Iterator[str]:
    """A reader role made by `accubooks reader-role` (dropped afterwards); its URL."""
    assert settings.database_url
    role = f"test_reader_{uuid.uuid4().hex[:12]}"
    code, made = accubooks("reader-role", role)
    assert code == 0 and made is not None, made
    assert made["role"] == role
    try:
        yield made["readDatabaseUrl"]
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.fixture
def scoped(settings: Settings, reader_url: str) -> Settings:
    return msgspec.structs.replace(settings, read_database_url=reader_url)


@pytest.fixture
def two_tenants(
    scoped: Settings, event_log: EventLog, operator: Collaborators
) -> tuple[Tenant, Tenant]:
    """Two tenants with scenarios and forecasts, every read model caught up, written
    through an API reading as the reader role (no job workers: forecasts stay queued, so
    the queue's table has rows too). Its projection workers have stopped."""
    app = create_app(scoped, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        assert app.state.read_api.store.tenant_scoped
        first, second = make_tenant(operator, "First"), make_tenant(operator, "Second")
        some_commands(client, first)
        some_commands(client, second)
    return first, second


@pytest.fixture
def reading(scoped: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """An API process reading as the reader role."""
    app = create_app(scoped, event_log=event_log)
    with TestClient(app) as client:
        assert app.state.read_api.store.tenant_scoped
        yield client


def _owner_counts(settings: Settings, table: str) -> dict[str, int]:
    assert settings.database_url
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(f"SELECT tenant_id, COUNT(*) FROM {table} GROUP BY tenant_id")
        return {str(tenant): int(n) for tenant, n in rows.fetchall()}


def test_the_api_serves_every_read_route_as_the_reader_and_only_the_tenants_own_rows(
    two_tenants: tuple[Tenant, Tenant], reading: TestClient
) -> None:
    client, (first, second) = reading, two_tenants
    for tenant, other in ((first, second), (second, first)):
        listed = read(client, tenant.reader, "/api/scenarios").json()
        assert listed["pagination"]["total"] == 4 and len(listed["data"]) == 4
        names = {item["name"] for item in listed["data"]}
        assert names == {"Renamed", "Scenario 1", "Scenario 2", "Scenario 3"}
        one = listed["data"][0]["id"]
        assert read(client, tenant.reader, f"/api/scenarios/{one}").json()["id"] == one
        foreign = read(client, other.reader, "/api/scenarios").json()["data"][0]["id"]
        hidden = client.get(
            f"/api/scenarios/{foreign}", headers={"Authorization": f"Bearer {tenant.reader}"}
        )
        assert hidden.status_code == 404, hidden.text
        forecasts = read(client, tenant.reader, "/api/forecasts").json()
        assert forecasts["pagination"]["total"] == 3
        dashboard = read(client, tenant.reader, "/api/dashboard").json()
        assert dashboard["scenarios"]["total"] == 4
        usage = read(client, tenant.reader, "/api/usage").json()
        assert usage, usage
        audited = read(client, tenant.auditor, "/api/audit/events?limit=100").json()["data"]
        aggregates = {event["aggregateId"] for event in audited}
        own = {item["id"] for item in listed["data"]}
        others = read(client, other.reader, "/api/scenarios").json()["data"]
        theirs = {item["id"] for item in others}
        assert own <= aggregates and not theirs & aggregates


def test_a_read_without_its_tenant_filter_still_sees_only_the_acting_tenants_rows(
    scoped: Settings, two_tenants: tuple[Tenant, Tenant]
) -> None:
    """Every read-model table that holds tenants' rows, read through the API's own store
    with no tenant filter at all: as if the application forgot it on every route."""
    first, second = two_tenants
    store = ReadStore.for_tenants(scoped)
    tables = [table for projector in wiring.projectors() for table in tenant_tables(projector)]
    assert len(tables) >= 9, tables  # scenarios, forecasts, dashboard, usage, queue, audit
    try:
        for table in tables:
            owner = _owner_counts(scoped, table)
            for tenant in (first, second):
                mine = str(tenant.tenant_id)
                assert owner.get(mine, 0) > 0, (table, owner)  # the test has rows to hide
                with readstore.acting_for(mine):
                    rows = store.query("scenarios", f"SELECT tenant_id FROM {table}")
                assert {row["tenant_id"] for row in rows} == {mine}, table
                assert len(rows) == owner[mine], table
            # Outside any tenant's request: no tenant's rows at all.
            assert store.query("scenarios", f"SELECT tenant_id FROM {table}") == [], table
    finally:
        store.close()


def test_the_reader_cannot_read_the_log_or_write_a_read_model(
    reader_url: str, two_tenants: tuple[Tenant, Tenant]
) -> None:
    first, _ = two_tenants
    with psycopg.connect(reader_url, autocommit=True) as conn:
        conn.execute("SELECT set_config('accubooks.tenant', %s, false)", [str(first.tenant_id)])
        for statement in (
            "SELECT COUNT(*) FROM accubooks_events",  # every tenant's events
            "SELECT COUNT(*) FROM scenarios_parked",  # parked events, any tenant's
            "SELECT COUNT(*) FROM dashboard_forecasts",  # a projector's own bookkeeping
            "UPDATE scenarios_rows SET name = 'x'",
            "DELETE FROM scenarios_rows",
            "ALTER TABLE scenarios_rows DISABLE ROW LEVEL SECURITY",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_a_rebuild_switch_keeps_the_readers_access_and_the_policies(
    scoped: Settings,
    event_log: EventLog,
    two_tenants: tuple[Tenant, Tenant],
) -> None:
    first, second = two_tenants  # their projection workers have stopped: a switch needs it
    # Run as an operator would, without READ_DATABASE_URL: the switch carries the grants.
    unscoped = msgspec.structs.replace(scoped, read_database_url=None)
    report = rebuilder.rebuild(unscoped, event_log, wiring.projectors(), switch=True)
    assert report.differences == 0, rebuilder.describe(report)
    store = ReadStore.for_tenants(scoped)
    try:
        for tenant in (first, second):
            with readstore.acting_for(tenant.tenant_id):
                rows = store.query("scenarios", "SELECT tenant_id FROM scenarios_rows")
            assert [row["tenant_id"] for row in rows] == [str(tenant.tenant_id)] * 4
    finally:
        store.close()
    app = create_app(scoped, event_log=event_log)
    with TestClient(app) as again:
        assert read(again, first.reader, "/api/scenarios").json()["pagination"]["total"] == 4


def test_the_api_refuses_a_reader_role_that_row_level_security_does_not_bind(
    settings: Settings, event_log: EventLog
) -> None:
    # The tables' owner (here also a superuser) would see every tenant's rows.
    owner = msgspec.structs.replace(settings, read_database_url=settings.database_url)
    with (
        pytest.raises(RuntimeError, match="exempt from row-level security"),
        TestClient(create_app(owner, event_log=event_log)),
    ):
        pass


def test_reader_role_refuses_a_name_it_would_have_to_quote(
    accubooks: Any,  # noqa: F811 (the fixture)
) -> None:
    code, _ = accubooks("reader-role", "Robert'); DROP TABLE x;--")
    assert code == 1
