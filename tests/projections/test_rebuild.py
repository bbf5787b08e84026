"""`accubooks projections rebuild` on both backends, through the CLI's entry point: a
rebuild of an intact store matches the live read models row for row (also while a live
worker follows a log that keeps growing); a row altered, removed or forged by hand in a
live table is reported by table and primary key, and nothing else; --switch puts the
rebuilt copy in place (equal to a fresh replay) while an API process keeps answering, and
refuses while the read model's worker runs."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import msgspec
import psycopg
import pytest
from starlette.testclient import TestClient

from infra.eventstore import EventLog, projection_file
from infra.settings import Settings
from projections import rebuild as rebuilder
from projections.runner import ProjectionRunner
from service import cli, wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers
from tests.projections.test_projection_processes import (
    assert_same_rows,
    dump,
    positions,
    store_of,
    write_bulk,
)
from tests.projections.test_projection_processes import rebuild as fresh_replay
from tests.readapi.test_cache import SHARED_REDIS, redis_prefix  # noqa: F401 (a fixture)
from tests.readapi.test_reads import create, read, request_forecast, settle

PROJECTIONS = [projector.name for projector in wiring.projectors()]
WAIT_S = 60.0
# Rounds of about 100 events a writer appends while a verify runs, at most (it stops when
# the verify returns; the bound only keeps a hung verify from filling the disk).
WRITES_DURING_VERIFY = 200


@pytest.fixture
def accubooks(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Runs `accubooks ARGS... --json` in this process on the test's store; returns its
    exit code and the report it printed."""
    for name in ("DATABASE_URL", "REDIS_URL", "BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("ACCUBOOKS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACCUBOOKS_DATA_DIR", settings.data_dir)
    # A switch refused because a worker holds its lock is refused after this long.
    monkeypatch.setenv("ACCUBOOKS_DB_LOCK_TIMEOUT_S", "1")
    if settings.database_url:
        monkeypatch.setenv("DATABASE_URL", settings.database_url)

    def run(*args: str) -> tuple[int, dict[str, Any] | None]:
        capsys.readouterr()
        code = cli.main([*args, "--json"])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip() else None

    return run


@pytest.fixture
def live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    """The embedded process with its projection workers (no job workers: forecasts stay
    queued, so every read-model table has rows)."""
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


def some_commands(client: TestClient, tenant: Tenant) -> list[dict[str, Any]]:
    """Scenarios created, renamed, archived, with forecasts requested; all projected."""
    created = [create(client, tenant, name=f"Scenario {n}") for n in range(4)]
    renamed = client.patch(
        f"/api/scenarios/{created[0]['id']}",
        json={"name": "Renamed"},
        headers=command_headers(tenant.writer),
    )
    assert renamed.status_code == 200, renamed.text
    settle(client, renamed)
    archived = client.post(
        f"/api/scenarios/{created[3]['id']}/archive", headers=command_headers(tenant.writer)
    )
    assert archived.status_code == 200, archived.text
    settle(client, archived)
    for scenario in created[:2]:
        request_forecast(client, tenant, scenario["id"])
    request_forecast(client, tenant, created[0]["id"])
    return created


def alter(settings: Settings, projection: str, sql: str, params: Sequence[Any]) -> None:
    """Changes a live read-model table by hand (``?`` placeholders), one row exactly."""
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as pg:
            changed = pg.execute(sql.replace("?", "%s"), params).rowcount
    else:
        with closing(sqlite3.connect(projection_file(settings, projection))) as lite, lite:
            changed = lite.execute(sql, params).rowcount
    assert changed == 1, f"{sql} changed {changed} rows"


def differences(report: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Every listed row of the report: (projection, table, kind, primary key)."""
    return [
        (projection["name"], table["table"], row["kind"], row["key"])
        for projection in report["projections"]
        for table in projection["tables"]
        for row in table["rows"]
    ]


def assert_clean(report: dict[str, Any], position: int) -> None:
    assert report["differences"] == 0, differences(report)
    assert [p["name"] for p in report["projections"]] == PROJECTIONS
    for projection in report["projections"]:
        assert projection["comparedAt"] == projection["position"] == position, projection
        assert projection["differences"] == 0
        assert projection["tables"], f"{projection['name']}: no table compared"
    assert report["events"] > 0


def test_rebuild_with_verify_reports_no_difference_then_exactly_the_row_altered_by_hand(
    settings: Settings, event_log: EventLog, tenant: Tenant, live: TestClient, accubooks: Any
) -> None:
    some_commands(live, tenant)
    end = event_log.position()

    code, report = accubooks("projections", "rebuild", "--verify")
    assert code == 0, report
    assert report is not None
    assert_clean(report, end)

    alter(
        settings,
        "dashboard",
        "UPDATE dashboard_tenants SET scenarios_total = scenarios_total + 7 WHERE tenant_id = ?",
        [str(tenant.tenant_id)],
    )
    code, report = accubooks("projections", "rebuild", "--verify")
    assert code == 1
    assert report is not None
    assert differences(report) == [
        ("dashboard", "dashboard_tenants", "changed", {"tenant_id": str(tenant.tenant_id)})
    ]
    assert report["differences"] == 1
    [dashboard] = [p for p in report["projections"] if p["name"] == "dashboard"]
    assert dashboard["comparedAt"] == end
    assert not dashboard["switched"]


def test_rows_missing_forged_or_changed_are_each_reported_by_kind_and_counted_beyond_the_list(
    settings: Settings, event_log: EventLog, tenant: Tenant, live: TestClient, accubooks: Any
) -> None:
    created = some_commands(live, tenant)
    [queued, *_] = [row["id"] for row in read(live, tenant.reader, "/api/forecasts").json()["data"]]
    forged = str(uuid.uuid4())
    alter(settings, "queue", "DELETE FROM queue_active WHERE id = ?", [queued])
    alter(
        settings,
        "queue",
        "INSERT INTO queue_active (id, tenant_id, status) VALUES (?, ?, 'queued')",
        [forged, str(tenant.tenant_id)],
    )
    alter(
        settings,
        "scenarios",
        "UPDATE scenarios_rows SET name = 'Forged' WHERE id = ?",
        [created[1]["id"]],
    )
    # Every audited event at once: more rows than a report lists.
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as pg:
            audited = pg.execute("UPDATE audit_events SET actor_id = 'forged'").rowcount
    else:
        with closing(sqlite3.connect(projection_file(settings, "audit"))) as lite, lite:
            audited = lite.execute("UPDATE audit_events SET actor_id = 'forged'").rowcount

    code, report = accubooks("projections", "rebuild", "--verify")
    assert code == 1
    assert report is not None
    listed = differences(report)
    assert [d for d in listed if d[0] != "audit"] == [
        (
            "scenarios",
            "scenarios_rows",
            "changed",
            {"tenant_id": str(tenant.tenant_id), "id": created[1]["id"]},
        ),
        ("queue", "queue_active", "onlyLive", {"id": forged}),
        ("queue", "queue_active", "onlyRebuilt", {"id": queued}),
    ]
    [audit] = [p for p in report["projections"] if p["name"] == "audit"]
    [events_table] = [t for t in audit["tables"] if t["table"] == "audit_events"]
    assert events_table["changed"] == audited > 20
    assert len(events_table["rows"]) == 20
    assert report["differences"] == 3 + audited


def test_switch_puts_a_fresh_replay_in_place_while_the_api_keeps_answering(
    settings: Settings, event_log: EventLog, tenant: Tenant, accubooks: Any
) -> None:
    workers = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(workers) as client:
        some_commands(client, tenant)
        alter(
            settings,
            "dashboard",
            "UPDATE dashboard_tenants SET scenarios_total = 99 WHERE tenant_id = ?",
            [str(tenant.tenant_id)],
        )
        # Refused while the read model's worker runs (it holds the lock), nothing changed.
        code, report = accubooks("projections", "rebuild", "dashboard", "--switch")
        assert (code, report) == (2, None)
    end = event_log.position()
    # An API process without workers, reading straight from the database (no cache),
    # open before the switch and used across it.
    api = create_app(settings, event_log=event_log, run_projections=False)
    with TestClient(api) as client:
        for _ in range(6):  # past psycopg's prepare threshold: statements are prepared
            before = read(client, tenant.reader, "/api/dashboard")
            assert before.json()["scenarios"]["total"] == 99

        code, report = accubooks("projections", "rebuild", "--verify", "--switch")
        assert code == 1, report
        assert report is not None
        assert differences(report) == [
            ("dashboard", "dashboard_tenants", "changed", {"tenant_id": str(tenant.tenant_id)})
        ]
        for projection in report["projections"]:
            assert projection["switched"]
            assert projection["comparedAt"] == projection["position"] == end, projection

        after = read(client, tenant.reader, "/api/dashboard")
        assert after.status_code == 200, after.text
        assert after.json()["scenarios"] == {
            "total": 4,
            "active": 3,
            "archived": 1,
            "byType": {"HIRING": 4},
        }
        assert after.headers["X-Projection-Position"] == str(end)
        listing = read(client, tenant.reader, "/api/scenarios")
        assert listing.status_code == 200
        assert listing.json()["pagination"]["total"] == 4

    code, report = accubooks("projections", "rebuild", "--verify")
    assert code == 0, report
    assert report is not None
    assert_clean(report, end)
    with fresh_replay(settings, event_log) as replayed, store_of(settings) as store:
        fresh = replayed.finished_store(end)
        assert positions(store) == positions(fresh)
        assert_same_rows(dump(store), dump(fresh))


def test_verify_while_the_log_grows_compares_each_read_model_at_one_position(
    settings: Settings, event_log: EventLog, accubooks: Any
) -> None:
    write_bulk(event_log, events=3_000)
    runner = ProjectionRunner(settings, event_log, wiring.projectors(), wakeup_s=0.05)
    runner.start()
    stop = threading.Event()
    failures: list[BaseException] = []

    def keep_writing() -> None:
        try:
            for _ in range(WRITES_DURING_VERIFY):
                if stop.is_set():
                    return
                write_bulk(event_log, events=100, tenant_count=1)
        except BaseException as e:
            failures.append(e)

    writer = threading.Thread(target=keep_writing, name="writer")
    try:
        assert runner.wait_for(event_log.position(), WAIT_S)
        writer.start()
        start = event_log.position()
        code, report = accubooks("projections", "rebuild", "--verify")
    finally:
        stop.set()
        writer.join(WAIT_S)
        runner.stop()
    assert not failures, failures
    assert code == 0, report
    assert report is not None
    assert report["differences"] == 0, differences(report)
    assert all(p["comparedAt"] >= start for p in report["projections"]), report


def test_switch_invalidates_the_answers_cached_in_redis(
    settings: Settings,
    event_log: EventLog,
    tenant: Tenant,
    accubooks: Any,
    redis_prefix: str,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cached = msgspec.structs.replace(settings, redis_url=SHARED_REDIS, cache_prefix=redis_prefix)
    workers = create_app(cached, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(workers) as client:
        some_commands(client, tenant)
    alter(
        settings,
        "dashboard",
        "UPDATE dashboard_tenants SET scenarios_total = 99 WHERE tenant_id = ?",
        [str(tenant.tenant_id)],
    )
    api = create_app(cached, event_log=event_log, run_projections=False)
    with TestClient(api) as client:
        for _ in range(2):  # the second answer comes from Redis
            assert read(client, tenant.reader, "/api/dashboard").json()["scenarios"]["total"] == 99
        monkeypatch.setenv("REDIS_URL", SHARED_REDIS)
        monkeypatch.setenv("ACCUBOOKS_CACHE_PREFIX", redis_prefix)
        code, report = accubooks("projections", "rebuild", "dashboard", "--switch")
        assert code == 0, report
        # Redis is bumped before the command returns; an API process's memory tier hears
        # of it over pub/sub, within cache_local_max_lag_s at the latest.
        deadline = time.monotonic() + cached.cache_local_max_lag_s + 1.0
        while (total := dashboard_total(client, tenant)) != 4:
            assert time.monotonic() < deadline, total
            time.sleep(0.01)


def dashboard_total(client: TestClient, tenant: Tenant) -> int:
    total: int = read(client, tenant.reader, "/api/dashboard").json()["scenarios"]["total"]
    return total


def test_a_rebuild_replayed_in_two_processes_matches_the_live_read_models(
    settings: Settings, event_log: EventLog, tenant: Tenant, live: TestClient
) -> None:
    # PostgreSQL splits a large first replay between processes (each with some of the read
    # models); here every replay is "large", and the result must equal the live workers'.
    some_commands(live, tenant)
    end = event_log.position()
    report = rebuilder.rebuild(
        settings,
        event_log,
        wiring.projectors(),
        verify=True,
        batch_size=3,
        processes=2,
        parallel_min_events=0,
    )
    assert report.differences == 0, rebuilder.describe(report)
    assert {p.name: p.compared_at for p in report.projections} == dict.fromkeys(
        [p.name for p in wiring.projectors()], end
    )
