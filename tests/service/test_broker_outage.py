"""Case 11 of the reliability suite: the job broker (a private redis-server) is down while
forecasts are requested, with `accubooks api`, `accubooks project` (the dispatcher) and
`accubooks worker` running as real processes. Every request is still accepted (202: the
log is the outbox), nothing is parked, and once the broker is back, with no process
restarted, every forecast is delivered and completed exactly once."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx2
import pytest

from commands.context import Collaborators
from infra.eventstore import EventLog
from infra.settings import Settings
from tests.conftest import command_headers, make_tenant, scenario_body
from tests.faults import private_redis
from tests.service.processes import api_process
from tests.service.test_cli import PROJECT_ROOT, cli_env

FORECASTS = 10
OUTAGE_S = 3.0  # how long the broker stays down after the last request
DELIVERED_S = 90.0  # the bound for every forecast to complete once it is back
ACCEPTED_S = 5.0  # the bound of each request's answer while it is down
HTTP_TIMEOUT_S = 15.0
STARTED_S = 60.0


@contextmanager
def cli_process(
    settings: Settings, env: dict[str, str], log_path: Path, *args: str
) -> Iterator[subprocess.Popen[str]]:
    """`accubooks <args> --json`, yielded once it has said it started (its first line)."""
    with log_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args, "--json"],
            cwd=PROJECT_ROOT,
            env={**cli_env(settings), **env},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], STARTED_S)
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


def completions(log: EventLog) -> Counter[str]:
    """Forecast.Completed events per forecast id in the log."""
    found: Counter[str] = Counter()
    position = 0
    while page := log.recorder.select_notifications(position + 1, 1000):
        for notification in page:
            if notification.topic == "accubooks:Forecast.Completed":
                found[str(notification.originator_id)] += 1
        position = page[-1].id
    return found


@pytest.mark.timeout(300)
def test_forecasts_requested_while_the_broker_is_down_are_all_delivered_once_later(
    settings: Settings, event_log: EventLog, operator: Collaborators, tmp_path: Path
) -> None:
    tenant = make_tenant(operator)
    with ExitStack() as stack:
        broker = stack.enter_context(private_redis())
        env = {
            "BROKER_URL": broker.url,
            "ACCUBOOKS_LOG_LEVEL": "WARNING",
            # A loaded machine must not turn a slow projection into a failed read here.
            "ACCUBOOKS_READ_YOUR_WRITES_TIMEOUT_S": "15",
        }
        running = stack.enter_context(api_process(settings, tmp_path / "api.log", env))
        project = stack.enter_context(
            cli_process(settings, env, tmp_path / "project.log", "project")
        )
        worker = stack.enter_context(cli_process(settings, env, tmp_path / "worker.log", "worker"))
        http = stack.enter_context(httpx2.Client(base_url=running.url, timeout=HTTP_TIMEOUT_S))
        created = http.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
        assert created.status_code == 201, created.text
        scenario_id = created.json()["id"]

        broker.stop()
        forecast_ids: list[str] = []
        for _ in range(FORECASTS):
            started = time.monotonic()
            response = http.post(
                "/api/forecasts/generate",
                json={"scenarioId": scenario_id, "horizonMonths": 12, "paths": 200},
                headers=command_headers(tenant.writer),
            )
            assert time.monotonic() - started < ACCEPTED_S
            assert response.status_code == 202, response.text
            forecast_ids.append(response.json()["forecastId"])
        token = response.headers["X-Consistency-Token"]
        time.sleep(OUTAGE_S)
        reader = {"Authorization": f"Bearer {tenant.reader}"}
        listed = http.get(
            f"/api/forecasts?scenarioId={scenario_id}&limit=100",
            headers={**reader, "X-Consistency-Token": token},
        )
        assert listed.status_code == 200, listed.text
        statuses = Counter(row["status"] for row in listed.json()["data"])
        assert statuses == Counter({"queued": FORECASTS}), statuses

        broker.start()
        deadline = time.monotonic() + DELIVERED_S
        pending = set(forecast_ids)
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} forecasts never completed"
            for forecast_id in sorted(pending):
                found = http.get(f"/api/forecasts/{forecast_id}", headers=reader)
                assert found.status_code == 200, found.text
                assert found.json()["status"] in ("queued", "running", "completed"), found.text
                if found.json()["status"] == "completed":
                    pending.discard(forecast_id)
            time.sleep(0.2)
        assert project.poll() is None and worker.poll() is None, "a process died"
        # The outage was waited out, not treated as a failing event: nothing parked.
        ready = http.get("/health/ready")
        assert ready.json()["checks"]["parkedEvents"]["value"] == 0, ready.text

    done = completions(event_log)
    assert {fid: done[fid] for fid in forecast_ids} == dict.fromkeys(forecast_ids, 1)
    print(f"broker outage: {FORECASTS} forecasts accepted (202) while down, all completed once")
