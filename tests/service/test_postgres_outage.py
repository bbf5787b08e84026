"""Case 8 of the reliability suite: PostgreSQL stopped (as a crash: no checkpoint) under a
running `accubooks api` and `accubooks project`, then started again, on a private cluster
of the test's own. While it is down every command and read answers 503
SERVICE_UNAVAILABLE in the error envelope, within the bound, never another 5xx;
/health/ready answers 503 and /health/live 200. Once it is back, with no process
restarted: commands and reads succeed again, readiness is 200, the projection worker
has applied everything, and no acknowledged command is lost or doubled (the commands
refused during the outage, retried with their keys, are applied once)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import psycopg
import pytest

from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import open_event_log
from infra.settings import Settings
from tests.conftest import make_tenant, scenario_body
from tests.faults import private_postgres
from tests.service.processes import api_process
from tests.service.test_cli import PROJECT_ROOT, cli_env
from tests.service.test_kill_after_commit import created_names

BOUND_S = 5.5  # the longest any answer may take while the database is down
OUTAGE_S = 4.0  # how long requests are sent while it is down
PAUSE_S = 0.1  # between rounds of requests while it is down
RECOVERY_S = 30.0  # the longest full service may take to come back
HTTP_TIMEOUT_S = 30.0
ENV = {
    "ACCUBOOKS_LOG_LEVEL": "WARNING",
    "ACCUBOOKS_DB_POOL_TIMEOUT_S": "2",
    "ACCUBOOKS_DB_CONNECT_TIMEOUT_S": "2",
    "ACCUBOOKS_HEALTH_TIMEOUT_S": "1",
    "ACCUBOOKS_STATUS_REFRESH_S": "0.5",
    # After the restart the projection worker must catch up: a read waits for it.
    "ACCUBOOKS_READ_YOUR_WRITES_TIMEOUT_S": "20",
}


@contextmanager
def project_process(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[str]]:
    """`accubooks project`, yielded once it has said it is projecting (its first line)."""
    with log_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "project", "--json"],
            cwd=PROJECT_ROOT,
            env={**cli_env(settings), **ENV},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], HTTP_TIMEOUT_S)
        assert ready and process.stdout.readline(), log_path.read_text()[-3000:]
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=HTTP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=HTTP_TIMEOUT_S)
        process.stdout.close()


def create(http: httpx2.Client, writer: str, name: str, key: str) -> httpx2.Response:
    return http.post(
        "/api/scenarios",
        content=json.dumps(scenario_body(name=name)),
        headers={
            "Authorization": f"Bearer {writer}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        },
    )


def timed(call: object) -> tuple[httpx2.Response, float]:
    assert callable(call)
    started = time.monotonic()
    response = call()
    assert isinstance(response, httpx2.Response)
    return response, time.monotonic() - started


@pytest.mark.timeout(300)
def test_postgres_stopped_and_started_answers_503_then_recovers_losing_nothing(
    tmp_path: Path,
) -> None:
    with private_postgres() as pg:
        with psycopg.connect(pg.url(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE accubooks")
        settings = Settings(database_url=pg.url("accubooks"), data_dir=str(tmp_path))
        log = open_event_log(settings)
        try:
            tenant = make_tenant(Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4))
        finally:
            log.close()
        acknowledged: dict[str, str] = {}  # name -> idempotency key
        refused: dict[str, str] = {}
        with (
            api_process(settings, tmp_path / "api.log", ENV) as api,
            project_process(settings, tmp_path / "project.log") as project,
            httpx2.Client(base_url=api.url, timeout=HTTP_TIMEOUT_S) as http,
        ):
            reader = {"Authorization": f"Bearer {tenant.reader}"}
            for i in range(10):
                name, key = f"before {i}", uuid.uuid4().hex
                assert create(http, tenant.writer, name, key).status_code == 201
                acknowledged[name] = key

            pg.stop("immediate")
            answers: Counter[tuple[str, int]] = Counter()
            slowest = 0.0
            until = time.monotonic() + OUTAGE_S
            i = 0
            while time.monotonic() < until:
                name, key = f"during {i}", uuid.uuid4().hex
                i += 1
                for what, call in (
                    ("command", lambda: create(http, tenant.writer, name, key)),  # noqa: B023
                    ("read", lambda: http.get("/api/scenarios", headers=reader)),
                    ("ready", lambda: http.get("/health/ready")),
                    ("live", lambda: http.get("/health/live")),
                ):
                    response, took = timed(call)
                    slowest = max(slowest, took)
                    answers[(what, response.status_code)] += 1
                    assert took < BOUND_S, (what, took)
                    if what == "live":
                        assert response.status_code == 200, response.text
                        continue
                    assert response.status_code == 503, (what, response.text)
                    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE", response.text
                    assert response.headers["Retry-After"], response.headers
                    if what == "command":
                        refused[name] = key
                time.sleep(PAUSE_S)

            pg.start()
            restarted = time.monotonic()
            while True:
                name, key = "after", uuid.uuid4().hex
                response = create(http, tenant.writer, name, key)
                if response.status_code == 201:
                    acknowledged[name] = key
                    break
                assert response.status_code == 503, response.text
                assert time.monotonic() - restarted < RECOVERY_S, "no recovery in time"
                time.sleep(0.2)
            recovered_s = time.monotonic() - restarted
            # The commands refused while it was down, retried with their own keys.
            for name, key in refused.items():
                retried = create(http, tenant.writer, name, key)
                assert retried.status_code == 201, retried.text
                assert retried.headers.get("Idempotent-Replayed") != "true", name
                acknowledged[name] = key
            token = retried.headers["X-Consistency-Token"] if refused else "0"
            listed = http.get(
                "/api/scenarios?limit=100", headers={**reader, "X-Consistency-Token": token}
            )
            assert listed.status_code == 200, listed.text
            projected_s = time.monotonic() - restarted
            assert listed.json()["pagination"]["total"] == len(acknowledged), listed.text
            assert {row["name"] for row in listed.json()["data"]} <= set(acknowledged)
            deadline = time.monotonic() + RECOVERY_S
            while (ready := http.get("/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.2)
            assert api.process.poll() is None and project.poll() is None, "a process died"

        log = open_event_log(settings)
        try:
            names = created_names(log)
        finally:
            log.close()
        assert names == Counter(dict.fromkeys(acknowledged, 1))
        print(
            f"PostgreSQL outage of {OUTAGE_S:g} s: answers {dict(answers)}, slowest "
            f"{slowest:.2f} s; commands again {recovered_s:.2f} s after the restart, read "
            f"models caught up after {projected_s:.2f} s; "
            f"{len(acknowledged)} acknowledged commands in the log, each once"
        )
