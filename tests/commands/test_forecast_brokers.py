"""Forecast jobs across real processes on PostgreSQL: `accubooks project` (read models and
the dispatcher) and `accubooks worker` against Redis and RabbitMQ, the API in-process.
A forecast requested over HTTP completes end to end on each broker; forecasts requested
while the broker is down wait in the log (the outbox) and all complete once it is back;
a worker killed mid-job leaves its forecasts to the next worker, each completed exactly
once; a worker's time limit bounds the computation, not the start of its child. Every wait
is bounded; every process and private server is stopped in a finally."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import redis
from starlette.testclient import TestClient

from commands.context import Collaborators
from domain.forecast import QUEUED, RUNNING, TIMEOUT, Forecast
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.readstore import ReadStore
from infra.settings import Settings
from service import wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body
from tests.services import unavailable

ROOT = Path(__file__).resolve().parents[2]
# The bound of every single wait (a process starting, a job completing, a server
# answering): a hung process fails the test instead of hanging the suite.
DEADLINE_S = 90.0
POLL_S = 0.01
REDIS_HOST = "127.0.0.1"
SHARED_REDIS_PORT = 6379
RABBITMQ_PORT = 5672
PROJECTIONS = [projector.name for projector in wiring.projectors()] + ["dispatch"]


# --- services -------------------------------------------------------------------------------


@pytest.fixture
def event_log(postgres_settings: Settings) -> Iterator[EventLog]:
    log = open_event_log(postgres_settings)
    yield log
    log.close()


@pytest.fixture
def tenant(event_log: EventLog) -> Tenant:
    return make_tenant(Collaborators(log=event_log, clock=utc_now, new_id=uuid.uuid4))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A database of the shared Redis reserved for this test, flushed before and after."""
    url = f"redis://{REDIS_HOST}:{SHARED_REDIS_PORT}/{random.randint(7, 15)}"
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.RedisError as e:
        client.close()
        unavailable("Redis", e)
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=DEADLINE_S)


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A private virtual host on the shared RabbitMQ, deleted afterwards."""
    vhost = f"accubooks-test-{uuid.uuid4().hex[:12]}"
    try:
        socket.create_connection((REDIS_HOST, RABBITMQ_PORT), timeout=3).close()
        rabbitmqctl("add_vhost", vhost)
    except (OSError, subprocess.SubprocessError) as e:
        unavailable("RabbitMQ", e)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{REDIS_HOST}:{RABBITMQ_PORT}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((REDIS_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PrivateRedis:
    """A redis-server of this test alone, stopped and started again on the same port."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", REDIS_HOST),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(host=REDIS_HOST, port=self.port, socket_connect_timeout=1)
        try:

            def answers() -> bool:
                assert self.proc is not None
                assert self.proc.poll() is None, f"redis-server exited ({self.proc.returncode})"
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            wait_until(answers, f"redis-server answers on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server", FileNotFoundError("redis-server is not on PATH"))
    server = PrivateRedis(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- `accubooks project` and `accubooks worker` processes -----------------------------------


@dataclass
class Process:
    label: str
    proc: subprocess.Popen[str]
    stderr: IO[str]

    def logged(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def started(self) -> dict[str, Any]:
        """The process's first line, once it is running (bounded)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE_S)
        assert ready, f"{self.label} printed nothing in {DEADLINE_S}s: {self.logged()[-3000:]}"
        line = self.proc.stdout.readline()
        assert line, f"{self.label} exited ({self.proc.poll()}): {self.logged()[-3000:]}"
        first: dict[str, Any] = json.loads(line)
        return first

    def kill(self) -> None:
        """SIGKILL to the process and its children (the model's forkserver and the
        computation): a machine that dies, no clean stop."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE_S)


def process_env(settings: Settings, broker_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ACCUBOOKS_")
        and name not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "PGAPPNAME")
    }
    assert settings.database_url is not None
    env.update(
        DATABASE_URL=settings.database_url,
        BROKER_URL=broker_url,
        ACCUBOOKS_DATA_DIR=settings.data_dir,
        **extra,
    )
    return env


@contextmanager
def accubooks(command: str, settings: Settings, broker_url: str, **extra: str) -> Iterator[Process]:
    """`accubooks <command> --json` in its own process group, stopped (SIGTERM, then
    SIGKILL to the group) when the block ends."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", command, "--json"],
            cwd=ROOT,
            env=process_env(settings, broker_url, extra),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        try:
            yield Process(command, proc, stderr)
        finally:
            if proc.poll() is None:
                proc.terminate()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
            # Whatever of the group is left (a forkserver, a computation).
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()


@contextmanager
def project(settings: Settings, broker_url: str) -> Iterator[Process]:
    with accubooks("project", settings, broker_url) as process:
        assert process.started() == {"projections": PROJECTIONS, "pid": process.proc.pid}
        yield process


@contextmanager
def worker(settings: Settings, broker_url: str, **extra: str) -> Iterator[Process]:
    with accubooks("worker", settings, broker_url, **extra) as process:
        assert process.started() == {"worker": "forecasts", "pid": process.proc.pid}
        yield process


def wait_until(
    condition: Callable[[], bool],
    what: str,
    running: Sequence[Process] = (),
    timeout_s: float = DEADLINE_S,
) -> None:
    """Polls ``condition`` until it holds; fails at the deadline or when a process that
    should be running has exited."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not condition():
        for process in running:
            code = process.proc.poll()
            assert code is None, f"{process.label} exited ({code}): {process.logged()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        pause.wait(POLL_S)


# --- the API and the log --------------------------------------------------------------------


@contextmanager
def api(settings: Settings, log: EventLog) -> Iterator[TestClient]:
    """An API process's app (no projections of its own: `accubooks project` runs them)."""
    with TestClient(create_app(settings, event_log=log)) as client:
        yield client


def create_scenario(client: TestClient, tenant: Tenant) -> str:
    response = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    scenario_id: str = response.json()["id"]
    return scenario_id


def generate(
    client: TestClient, tenant: Tenant, scenario_id: str, *, horizon: int = 12, paths: int = 500
) -> str:
    response = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, "horizonMonths": horizon, "paths": paths},
        headers=command_headers(tenant.writer),
    )
    assert response.status_code == 202, response.text
    forecast_id: str = response.json()["forecastId"]
    return forecast_id


def status(log: EventLog, forecast_id: str) -> str:
    forecast = log.find(uuid.UUID(forecast_id), Forecast)
    assert forecast is not None, f"forecast {forecast_id} is not in the log"
    return forecast.status


def all_completed(log: EventLog, forecast_ids: Sequence[str]) -> Callable[[], bool]:
    def check() -> bool:
        statuses = [status(log, forecast_id) for forecast_id in forecast_ids]
        assert "failed" not in statuses, statuses
        return all(s == "completed" for s in statuses)

    return check


def finished(log: EventLog, forecast_ids: Sequence[str]) -> Callable[[], bool]:
    return lambda: all(status(log, f) in ("completed", "failed") for f in forecast_ids)


def failure_reason(log: EventLog, forecast_id: str) -> str | None:
    forecast = log.find(uuid.UUID(forecast_id), Forecast)
    assert forecast is not None, f"forecast {forecast_id} is not in the log"
    return forecast.failure_reason


def started(log: EventLog, forecast_ids: Sequence[str]) -> Callable[[], bool]:
    def check() -> bool:
        statuses = [status(log, forecast_id) for forecast_id in forecast_ids]
        assert "failed" not in statuses, statuses
        return RUNNING in statuses

    return check


def history(log: EventLog, forecast_id: str) -> Counter[str]:
    """How many of each event the forecast has (Requested, Started, Completed, Failed)."""
    stored = log.recorder.select_events(uuid.UUID(forecast_id))
    return Counter(type(log.mapper.to_domain_event(s)).__name__ for s in stored)


def read_forecast(client: TestClient, tenant: Tenant, forecast_id: str) -> dict[str, Any]:
    response = client.get(
        f"/api/forecasts/{forecast_id}", headers={"Authorization": f"Bearer {tenant.reader}"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def forecast_counts(client: TestClient, tenant: Tenant) -> dict[str, int]:
    response = client.get("/api/dashboard", headers={"Authorization": f"Bearer {tenant.reader}"})
    assert response.status_code == 200, response.text
    counts: dict[str, int] = response.json()["forecasts"]
    return counts


def all_counted_completed(client: TestClient, tenant: Tenant, total: int) -> Callable[[], bool]:
    """The dashboard (a read model of the project process) counts ``total`` completed."""
    done = {"total": total, "queued": 0, "running": 0, "completed": total, "failed": 0}
    return lambda: forecast_counts(client, tenant) == done


def dispatch_position(settings: Settings) -> int:
    store = ReadStore(settings)
    try:
        [row] = store.query(
            "dispatch",
            f"SELECT MAX(notification_id) AS position FROM {store.tracking_table('dispatch')}"
            " WHERE application_name = ?",
            [EventLog.name],
        )
        return int(row["position"] or 0)
    finally:
        store.close()


# --- the tests ------------------------------------------------------------------------------


def test_forecast_requested_over_http_completes_through_the_broker_and_the_worker(
    postgres_settings: Settings, event_log: EventLog, tenant: Tenant, broker_url: str
) -> None:
    with (
        project(postgres_settings, broker_url) as projecting,
        worker(postgres_settings, broker_url) as working,
        api(postgres_settings, event_log) as client,
    ):
        running = [projecting, working]
        forecast_id = generate(client, tenant, create_scenario(client, tenant))

        wait_until(all_completed(event_log, [forecast_id]), "the forecast completes", running)
        wait_until(
            lambda: read_forecast(client, tenant, forecast_id)["status"] == "completed",
            "the read model shows it completed",
            running,
        )
        forecast = read_forecast(client, tenant, forecast_id)

    assert len(forecast["result"]["cash"]) == 12
    assert forecast["result"]["paths"] == 500
    assert history(event_log, forecast_id) == {"Requested": 1, "Started": 1, "Completed": 1}


def test_a_small_forecast_completes_within_a_tight_time_limit_on_a_worker_process(
    postgres_settings: Settings, event_log: EventLog, tenant: Tenant, redis_url: str
) -> None:
    """The limit bounds the computation (a 1-month, 1-path forecast takes about a
    millisecond), not the start of the child that runs it: starting one imports the
    worker's main module (service.cli and the whole service stack, most of a second), so
    the worker starts its children before it takes jobs."""
    with (
        project(postgres_settings, redis_url) as projecting,
        worker(postgres_settings, redis_url, ACCUBOOKS_FORECAST_TIMEOUT_S="0.2") as working,
        api(postgres_settings, event_log) as client,
    ):
        running = [projecting, working]
        scenario_id = create_scenario(client, tenant)
        forecast_ids = [generate(client, tenant, scenario_id, horizon=1, paths=1) for _ in range(3)]
        wait_until(finished(event_log, forecast_ids), "every forecast finishes", running)

    assert [status(event_log, f) for f in forecast_ids] == ["completed"] * 3


def test_forecasts_after_timeouts_still_complete_within_a_tight_time_limit(
    postgres_settings: Settings, event_log: EventLog, tenant: Tenant, redis_url: str
) -> None:
    """Two forecasts over the limit kill the worker's two warm children. The next jobs
    must not pay for starting their replacements (the import of the worker's main module,
    most of a second) inside their own limit; today each creates its child lazily within
    the deadline, times out, has that child killed in turn, and so on: one timeout per
    warm child poisons every later job."""
    with (
        project(postgres_settings, redis_url) as projecting,
        worker(postgres_settings, redis_url, ACCUBOOKS_FORECAST_TIMEOUT_S="0.1") as working,
        api(postgres_settings, event_log) as client,
    ):
        running = [projecting, working]
        scenario_id = create_scenario(client, tenant)
        big = [generate(client, tenant, scenario_id, horizon=120, paths=100_000) for _ in range(2)]
        wait_until(finished(event_log, big), "the big forecasts time out", running)
        small = [generate(client, tenant, scenario_id, horizon=1, paths=1) for _ in range(3)]
        wait_until(finished(event_log, small), "the small forecasts finish", running)

    assert [failure_reason(event_log, f) for f in big] == [TIMEOUT] * 2
    assert [status(event_log, f) for f in small] == ["completed"] * 3, [
        failure_reason(event_log, f) for f in small
    ]


def test_forecasts_requested_while_the_broker_is_down_all_complete_once_it_is_back(
    postgres_settings: Settings,
    event_log: EventLog,
    tenant: Tenant,
    private_redis: PrivateRedis,
) -> None:
    url = private_redis.url
    with (
        project(postgres_settings, url) as projecting,
        worker(postgres_settings, url) as working,
        api(postgres_settings, event_log) as client,
    ):
        running = [projecting, working]
        scenario_id = create_scenario(client, tenant)
        private_redis.stop()

        forecast_ids = [generate(client, tenant, scenario_id) for _ in range(10)]
        # Counted once all ten are in the log, so the second failure counted below is of
        # an attempt that started after them: they had their chance.
        pauses = projecting.logged().count("projection dispatch paused")
        wait_until(
            lambda: projecting.logged().count("projection dispatch paused") >= pauses + 2,
            "the dispatcher fails to send twice",
            running,
        )
        while_down = [status(event_log, forecast_id) for forecast_id in forecast_ids]
        undispatched = dispatch_position(postgres_settings) < event_log.position()

        private_redis.start()
        wait_until(all_completed(event_log, forecast_ids), "every forecast completes", running)
        wait_until(
            all_counted_completed(client, tenant, 10), "the dashboard counts them all", running
        )

    assert while_down == [QUEUED] * 10
    assert undispatched, "the dispatcher moved past forecasts it could not send"
    for forecast_id in forecast_ids:
        assert history(event_log, forecast_id)["Completed"] == 1, forecast_id
        assert history(event_log, forecast_id)["Failed"] == 0, forecast_id


def test_forecasts_of_a_worker_killed_mid_job_complete_exactly_once_on_the_next_worker(
    postgres_settings: Settings, event_log: EventLog, tenant: Tenant, rabbitmq_url: str
) -> None:
    with (
        project(postgres_settings, rabbitmq_url) as projecting,
        api(postgres_settings, event_log) as client,
    ):
        scenario_id = create_scenario(client, tenant)
        with worker(postgres_settings, rabbitmq_url) as first:
            forecast_ids = [
                generate(client, tenant, scenario_id, horizon=120, paths=100_000) for _ in range(4)
            ]
            wait_until(started(event_log, forecast_ids), "a job has started", [projecting, first])
            first.kill()
        # Started and not finished once its worker is dead: cut off mid-job.
        interrupted = [f for f in forecast_ids if status(event_log, f) == RUNNING]
        assert interrupted, "every started job finished before the kill"
        with worker(postgres_settings, rabbitmq_url) as second:
            wait_until(
                all_completed(event_log, forecast_ids),
                "every forecast completes on the second worker",
                [projecting, second],
            )
            # A forecast started twice is still counted once, as completed.
            wait_until(
                all_counted_completed(client, tenant, len(forecast_ids)),
                "the dashboard counts them all",
                [projecting, second],
            )

    for forecast_id in forecast_ids:
        events = history(event_log, forecast_id)
        assert (events["Requested"], events["Completed"], events["Failed"]) == (1, 1, 0), events
        assert events["Started"] >= 1, events
    for forecast_id in interrupted:
        assert history(event_log, forecast_id)["Started"] >= 2, forecast_id
