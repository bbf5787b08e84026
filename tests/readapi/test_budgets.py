"""The database budget of a read: a statement held up by a lock is cancelled by the
server at ``db_statement_timeout_s`` (default 5 s) and answered 503 OPERATION_TIMEOUT
naming the operation; the connection it used goes back to the pool healthy."""

from __future__ import annotations

import time
import uuid

import msgspec
import psycopg
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from service.app import create_app
from tests.conftest import Tenant, make_tenant


def test_a_read_blocked_by_a_lock_times_out_and_the_next_one_succeeds(
    postgres_settings: Settings,
) -> None:
    assert postgres_settings.db_statement_timeout_s == 5.0
    assert postgres_settings.database_url is not None
    log: EventLog = open_event_log(postgres_settings)
    operator = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    try:
        tenant: Tenant = make_tenant(operator)
        headers = {"Authorization": f"Bearer {tenant.reader}"}
        # One pooled connection, so the read after the timeout reuses the one it had.
        app = create_app(_one_connection(postgres_settings), event_log=log, run_projections=False)
        with TestClient(app) as client:
            assert client.get("/api/dashboard", headers=headers).status_code == 200
            with psycopg.connect(postgres_settings.database_url) as locker:
                locker.execute("LOCK TABLE dashboard_tenants IN ACCESS EXCLUSIVE MODE")
                # Another tenant's dashboard: not cached, so it reaches the locked table.
                other = make_tenant(operator, "Other")
                started = time.monotonic()
                blocked = client.get(
                    "/api/dashboard", headers={"Authorization": f"Bearer {other.reader}"}
                )
                took = time.monotonic() - started
                locker.rollback()
            assert blocked.status_code == 503, blocked.text
            error = blocked.json()["error"]
            assert error["code"] == "OPERATION_TIMEOUT"
            assert error["operation"] == "getDashboard"
            assert blocked.headers["Retry-After"]
            assert 4.5 <= took <= 5.5, took

            for _ in range(3):
                after = client.get(
                    "/api/dashboard", headers={"Authorization": f"Bearer {other.reader}"}
                )
                assert after.status_code == 200, after.text
    finally:
        log.close()


def _one_connection(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, db_pool_size=1, db_pool_max_overflow=0)
