"""Read-path throughput on PostgreSQL + Redis: the seed's read mix at 100 connections
(wrk, 2 threads, perf/read_mix.lua) against one `accubooks api` process with the Redis
cache on, with the cache off, and with Redis stopped under it; quoted against a bare
Starlette JSON hello served the same way (uvicorn, one process) before and after, in the
same run, so the ratios survive a shared and noisy machine.

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user
postgres, and the Debian packages redis-server and wrk: `apt-get install -y wrk`):

    .venv/bin/python -m perf.read_bench

Options: --tenants 20 --scenarios 200 --forecasts 2 --duration-s 20 --warmup-s 5
--connections 100 --threads 2 --budget-s 600 (see --help). It creates and drops its own
database, starts a private redis-server on a free port (never the shared one), seeds the
log through the domain aggregates and the tenant commands (never read-model rows), lets
`accubooks project` build the read models, talks only to 127.0.0.1, prints the table and
writes perf/reports/read_path.md and perf/reports/read_path.json. Exits 1 when a phase has
errors or non-2xx answers, when its sampled answers do not carry the service status the
phase promises, or when the budget runs out; every process it started is stopped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2 as httpx
import msgspec
import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from commands import tenants as tenant_commands
from commands.context import Collaborators
from domain import forecast_model
from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from perf.harness import ADMIN_URL, REPORTS, ROOT, Deadline, git_head, postgres_database
from perf.projection_bench import ASSUMPTIONS, BASELINE, accubooks
from service import wiring

LUA = ROOT / "perf" / "read_mix.lua"
RESULT_MARK = "READ_BENCH_RESULT "
SAVE_AGGREGATES = 100  # aggregates per save() while seeding
FORECAST_MONTHS = 24
FORECAST_PATHS = 1000
FAILED_EVERY = 25  # every 25th seeded forecast failed, the rest completed (one queued per tenant)
ARCHIVED_EVERY = 10  # every 10th scenario archived (after its forecasts)
PAGE_LIMIT = 20
SAMPLE_REQUESTS = 200  # answers checked with httpx2 after each phase
REQUEST_TIMEOUT_S = 10.0
POLL_S = 0.2
STALL_S = 30.0  # a projection that does not move for this long has failed

# The seed's read endpoints (its "verified endpoints" and load-test routes, see issue 7)
# and the share of requests each gets. The seed names the endpoints but gives no weights:
# these favour the list and detail pages a client opens most, with the dashboard (the
# seed's slowest read) well represented.
MIX: dict[str, int] = {
    "scenario list": 30,
    "scenario detail": 25,
    "forecast list": 15,
    "forecast detail": 10,
    "dashboard": 15,
    "usage": 5,
}
DEGRADED = "degraded"
STATUS_HEADER = "x-service-status"


# --- the report's shape ---------------------------------------------------------------------


class Seeding(msgspec.Struct, frozen=True, kw_only=True):
    tenants: int
    scenarios: int
    archived: int
    forecasts_completed: int
    forecasts_failed: int
    forecasts_queued: int
    events: int
    write_s: float
    catch_up_s: float
    catch_up_events_per_s: float


class Wrk(msgspec.Struct, frozen=True, kw_only=True):
    """What read_mix.lua's done() prints (microseconds)."""

    requests: int
    duration_us: int
    bytes: int
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int
    timeouts: int
    p50_us: int
    p90_us: int
    p95_us: int
    p99_us: int
    max_us: int
    mean_us: float


class Cores(msgspec.Struct, frozen=True, kw_only=True):
    """CPU seconds per wall second during the measured run, by process (None: not
    measured). ``machine`` is every process on the machine; ``other`` what is left of it
    once the processes of this run are counted (other people's work on a shared box)."""

    server: float | None
    postgres: float | None
    redis: float | None
    wrk: float
    machine: float
    other: float


class RouteTime(msgspec.Struct, frozen=True, kw_only=True):
    """Server-side time of one route, from the API's own histogram (not wrk's clock)."""

    requests: int
    mean_ms: float
    # Upper bound of the histogram bucket holding the 95th percentile.
    p95_le_ms: float | None


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """Answers of the mix fetched one by one with httpx2 right after the phase."""

    requests: int
    ok_200: int
    degraded: int
    statuses: dict[str, int]


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    server: str
    wrk_command: str
    seconds: float
    requests: int
    req_per_s: float
    ratio_to_hello: float | None
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non_2xx: int  # wrk counts answers with status >= 400
    socket_errors: int  # connect, read, write errors and timeouts
    bytes_per_request: float
    cores: Cores
    cache_hits: int | None = None
    cache_misses: int | None = None
    cache_errors: int | None = None
    shed: int | None = None
    routes: dict[str, RouteTime] = {}
    sample: Sample | None = None
    expect_degraded: bool | None = None
    ok: bool = True
    problems: list[str] = []


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    cpu: str
    loadavg_1m_at_start: float
    loadavg_1m_at_end: float
    python: str
    postgres: str
    redis: str
    wrk: str
    uvicorn: str
    uvicorn_loop_http: str
    date: str
    git_head: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: Machine
    seeding: Seeding
    mix: dict[str, int]
    connections: int
    threads: int
    duration_s: float
    warmup_s: float
    # The API process's environment (besides DATABASE_URL), for every accubooks phase.
    api_env: dict[str, str]
    hello_req_per_s: float
    phases: list[Phase]
    problems: list[str]


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _stop(proc: subprocess.Popen[Any], *, kill: bool = False) -> None:
    if proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_until(check: Callable[[], bool], what: str, deadline: Deadline, limit_s: float) -> None:
    """Polls ``check`` until it is true, at most ``limit_s`` (and the budget)."""
    until = time.monotonic() + min(limit_s, deadline.remaining())
    while not check():
        if time.monotonic() > until:
            raise SystemExit(f"{what} did not happen in time")
        time.sleep(POLL_S / 4)


@dataclass
class RedisServer:
    url: str
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would."""
        _stop(self.proc, kill=True)


@contextmanager
def private_redis(directory: str, deadline: Deadline) -> Iterator[RedisServer]:
    """A redis-server of our own on a free port, no persistence; always stopped."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: apt-get install -y redis-server")
    port = free_port()
    if port == 6379:  # the shared server's port: never ours
        port = free_port()
    with open(Path(directory) / "redis.log", "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", proc)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

        def answers() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"redis-server exited: see {directory}/redis.log")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        _wait_until(answers, "the private redis-server answering", deadline, 20.0)
        client.close()
        yield server
    finally:
        _stop(proc)


def hello_app() -> Starlette:
    """The baseline: a bare Starlette JSON hello (served by uvicorn as a factory)."""

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    return Starlette(routes=[Route("/", hello)])


@contextmanager
def hello_server(deadline: Deadline) -> Iterator[tuple[str, int]]:
    """hello_app served the way `accubooks api` serves: uvicorn, one process, its default
    loop and HTTP implementation, no access log. Its URL and pid; always stopped."""
    port = free_port()
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "perf.read_bench:hello_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def answers() -> bool:
                if proc.poll() is not None:
                    stderr.seek(0)
                    raise SystemExit(f"the hello server exited: {stderr.read()[-2000:]!r}")
                try:
                    return httpx.get(url + "/", timeout=1.0, trust_env=False).status_code == 200
                except httpx.HTTPError:
                    return False

            _wait_until(answers, "the hello server answering", deadline, 30.0)
            yield url, proc.pid
        finally:
            _stop(proc)


@contextmanager
def api_process(
    database_url: str, env: dict[str, str], deadline: Deadline
) -> Iterator[tuple[str, int]]:
    """`accubooks api` on a free port with ``env``: its URL and pid; always stopped."""
    with accubooks(["api", "--host", "127.0.0.1", "--port", "0"], database_url, env) as proc:
        url = str(proc.first_line(deadline)["url"])
        httpx.get(url + "/health/live", timeout=REQUEST_TIMEOUT_S, trust_env=False)
        yield url, proc.proc.pid


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (no report), so every process started here
    is stopped."""

    def raise_exit(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_exit)


# --- seeding --------------------------------------------------------------------------------


@dataclass
class TenantReads:
    """What the mix may ask about one tenant."""

    key: str
    scenario_ids: list[str] = field(default_factory=list)
    forecast_ids: list[str] = field(default_factory=list)


@dataclass
class _Counts:
    scenarios: int = 0
    archived: int = 0
    completed: int = 0
    failed: int = 0
    queued: int = 0


def seed(
    log: EventLog, *, tenants: int, scenarios: int, forecasts: int, deadline: Deadline
) -> tuple[_Counts, list[TenantReads]]:
    """Tenants and reader keys through the tenant commands; per tenant ``scenarios``
    scenarios with ``forecasts`` forecasts each, saved through the log in the order the
    commands and the job worker would save them: a scenario, then its forecasts (requested,
    started, completed with the real model's result; a few failed, one queued per tenant),
    and after everything every tenth scenario archived."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    counts = _Counts()
    reads: list[TenantReads] = []
    pending: list[Scenario | Forecast] = []
    to_archive: list[tuple[Scenario, Actor]] = []

    def save(*aggregates: Scenario | Forecast) -> None:
        pending.extend(aggregates)
        if len(pending) >= SAVE_AGGREGATES:
            log.save(*pending)
            pending.clear()

    for t in range(tenants):
        tenant_id = tenant_commands.create_tenant(deps, f"Read bench {t}").tenant_id
        tenant = TenantReads(key=tenant_commands.issue_key(deps, tenant_id, "reader").key)
        reads.append(tenant)
        user = Actor(tenant_id=tenant_id, actor_id="bench", request_id=f"seed-{t}")
        worker = Actor(tenant_id=tenant_id, actor_id="worker", request_id=f"seed-{t}")
        for s in range(scenarios):
            if deadline.expired():
                raise SystemExit("the budget ran out while seeding")
            scenario = Scenario.create(
                user,
                scenario_id=uuid.uuid4(),
                name=f"Scenario {s}",
                baseline=BASELINE,
                assumptions=ASSUMPTIONS[s % len(ASSUMPTIONS)],
                at=utc_now(),
            )
            tenant.scenario_ids.append(str(scenario.id))
            counts.scenarios += 1
            made = [
                _forecast(scenario, user, worker, index=s * forecasts + f, counts=counts)
                for f in range(forecasts)
            ]
            tenant.forecast_ids.extend(str(forecast.id) for forecast in made)
            save(scenario, *made)
            if s % ARCHIVED_EVERY == ARCHIVED_EVERY - 1:
                to_archive.append((scenario, user))
    for scenario, user in to_archive:
        scenario.archive(user, at=utc_now())
        counts.archived += 1
        save(scenario)
    if pending:
        log.save(*pending)
    return counts, reads


def _forecast(
    scenario: Scenario, user: Actor, worker: Actor, *, index: int, counts: _Counts
) -> Forecast:
    """A forecast of ``scenario``: the tenant's first stays queued, every FAILED_EVERY-th
    failed, the others completed with the model's result for their own seed."""
    now = utc_now()
    forecast = Forecast.request(
        user,
        forecast_id=uuid.uuid4(),
        scenario=scenario,
        horizon_months=FORECAST_MONTHS,
        paths=FORECAST_PATHS,
        at=now,
    )
    if index == 0:
        counts.queued += 1
        return forecast
    forecast.start(worker, at=now)
    if index % FAILED_EVERY == 0:
        forecast.fail(worker, reason="ERROR", message="seeded failure", at=now)
        counts.failed += 1
        return forecast
    started = time.perf_counter()
    result = forecast_model.run_forecast(
        scenario.baseline,
        scenario.assumptions,
        horizon_months=FORECAST_MONTHS,
        paths=FORECAST_PATHS,
        seed=forecast.id,
    )
    forecast.complete(
        worker,
        result=msgspec.to_builtins(result),
        compute_seconds=round(time.perf_counter() - started, 6),
        at=utc_now(),
    )
    counts.completed += 1
    return forecast


def _positions(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for name in names:
        try:
            row = conn.execute(
                f"SELECT COALESCE(MAX(notification_id), 0) FROM {name}_tracking"
                " WHERE application_name = %s",
                [EventLog.name],
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            row = None  # the worker has not created its tables yet
        found[name] = int(row[0]) if row else 0
    return found


def project_until_caught_up(
    database_url: str, redis_url: str, end: int, deadline: Deadline
) -> float:
    """`accubooks project` (bumping the cache's generations in our Redis, as in
    production) until every read model has applied the log up to ``end``; then stopped.
    The seconds it took. A worker that stops moving for STALL_S fails the run."""
    names = [projector.name for projector in wiring.projectors()]
    with (
        accubooks(["project"], database_url, {"REDIS_URL": redis_url}) as project,
        psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn,
    ):
        started = time.perf_counter()
        project.first_line(deadline)
        last, moved = _positions(conn, names), time.monotonic()
        while min(last.values()) < end:
            time.sleep(POLL_S)
            now = _positions(conn, names)
            if now != last:
                last, moved = now, time.monotonic()
            stalled = time.monotonic() - moved > STALL_S
            if deadline.expired() or stalled or project.proc.poll() is not None:
                project.stderr.seek(0)
                raise SystemExit(
                    f"the read models did not catch up to {end}: {now}\n"
                    f"accubooks project said: {project.stderr.read()[-3000:]}"
                )
        return time.perf_counter() - started


# --- the mix --------------------------------------------------------------------------------


def write_plan(path: Path, reads: list[TenantReads], size: int, rng: random.Random) -> None:
    """``size`` requests drawn in the mix's proportions over every tenant, one per line
    (route, path, key) for read_mix.lua, which draws from them at random."""
    routes = list(MIX)
    lines: list[str] = []
    for route in rng.choices(routes, weights=[MIX[r] for r in routes], k=size):
        tenant = rng.choice(reads)
        if route == "scenario list":
            page = 1 if rng.random() < 0.7 else rng.randint(2, 5)
            target = f"/api/scenarios?page={page}&limit={PAGE_LIMIT}"
        elif route == "scenario detail":
            target = f"/api/scenarios/{rng.choice(tenant.scenario_ids)}"
        elif route == "forecast list":
            target = (
                f"/api/forecasts?limit={PAGE_LIMIT}"
                if rng.random() < 0.6
                else f"/api/forecasts?scenarioId={rng.choice(tenant.scenario_ids)}"
            )
        elif route == "forecast detail":
            target = f"/api/forecasts/{rng.choice(tenant.forecast_ids)}"
        elif route == "dashboard":
            target = "/api/dashboard"
        else:
            target = "/api/usage"
        lines.append(f"{route}\t{target}\t{tenant.key}")
    path.write_text("\n".join(lines) + "\n")


def _plan_lines(path: Path) -> list[tuple[str, str]]:
    """(path, key) of every line of a plan file."""
    found = []
    for line in path.read_text().splitlines():
        _, target, key = line.split("\t")
        found.append((target, key))
    return found


# --- measuring ------------------------------------------------------------------------------

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (its threads included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    # user nice system idle iowait irq softirq steal ...: busy is all but idle, iowait
    # and steal (time the hypervisor gave to someone else).
    user, nice, system, _, _, irq, softirq = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) * _TICK_S


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _backend_pids(database_url: str | None) -> list[int]:
    if database_url is None:
        return []
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


@dataclass
class CpuMeter:
    """CPU used during one wrk run by the server, its PostgreSQL backends (those alive at
    either end), Redis, wrk itself (this process's reaped children) and the machine."""

    server_pid: int
    database_url: str | None = None
    redis_pid: int | None = None
    _start: dict[str, float] = field(default_factory=dict)
    _pg: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self._pg = {
            pid: cpu for pid in _backend_pids(self.database_url) if (cpu := _cpu_s(pid)) is not None
        }
        self._start = {
            "server": _cpu_s(self.server_pid) or 0.0,
            "redis": (_cpu_s(self.redis_pid) or 0.0) if self.redis_pid else 0.0,
            "children": _children_cpu_s(),
            "machine": _machine_busy_s(),
            "wall": time.perf_counter(),
        }

    def stop(self) -> Cores:
        wall = time.perf_counter() - self._start["wall"]
        machine = (_machine_busy_s() - self._start["machine"]) / wall
        wrk = (_children_cpu_s() - self._start["children"]) / wall
        server_now = _cpu_s(self.server_pid)
        server = None if server_now is None else (server_now - self._start["server"]) / wall
        redis_now = _cpu_s(self.redis_pid) if self.redis_pid else None
        redis_cores = None if redis_now is None else (redis_now - self._start["redis"]) / wall
        postgres = None
        if self.database_url is not None:
            pids = set(self._pg) | set(_backend_pids(self.database_url))
            used = [
                cpu - self._pg.get(pid, 0.0) for pid in pids if (cpu := _cpu_s(pid)) is not None
            ]
            postgres = sum(used) / wall
        ours = sum(v for v in (server, postgres, redis_cores, wrk) if v is not None)
        return Cores(
            server=_round(server),
            postgres=_round(postgres),
            redis=_round(redis_cores),
            wrk=round(wrk, 2),
            machine=round(machine, 2),
            other=round(max(0.0, machine - ours), 2),
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass(frozen=True)
class LoadShape:
    connections: int
    threads: int
    duration_s: float
    warmup_s: float
    timeout_s: float


def wrk_command(url: str, plan: Path, shape: LoadShape, seconds: float) -> list[str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk (Debian's package)")
    return [
        wrk,
        f"-t{shape.threads}",
        f"-c{shape.connections}",
        f"-d{seconds:g}s",
        f"--timeout={shape.timeout_s:g}s",
        "-s",
        str(LUA.relative_to(ROOT)),
        url,
        "--",
        str(plan),
    ]


def run_wrk(command: list[str], seconds: float, deadline: Deadline) -> Wrk:
    if deadline.remaining() < seconds + 5:
        raise SystemExit("the budget ran out before a wrk run")
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"wrk did not finish within {seconds + 60:g} s") from None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return msgspec.json.decode(line.removeprefix(RESULT_MARK), type=Wrk)
    raise SystemExit(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")


# One sample of a Prometheus series: (name, sorted labels) -> value.
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Series:
    text = httpx.get(url + "/metrics", timeout=REQUEST_TIMEOUT_S, trust_env=False).text
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return series


def _delta(before: Series, after: Series, name: str, **labels: str) -> int:
    want = set(labels.items())
    return round(
        sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and want <= set(k[1]))
    )


def route_times(before: Series, after: Series) -> dict[str, RouteTime]:
    """Per read route (all methods and statuses together): requests, mean and the p95
    bucket during the phase, from the API's request-duration histogram."""
    name = "accubooks_request_duration_seconds"
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for key, value in after.items():
        labels = dict(key[1])
        route, change = labels.get("route", ""), value - before.get(key, 0.0)
        if not route.startswith("/api/"):
            continue
        if key[0] == name + "_count":
            counts[route] = counts.get(route, 0.0) + change
        elif key[0] == name + "_sum":
            sums[route] = sums.get(route, 0.0) + change
        elif key[0] == name + "_bucket":
            per_le = buckets.setdefault(route, {})
            le = float(labels["le"])
            per_le[le] = per_le.get(le, 0.0) + change
    found: dict[str, RouteTime] = {}
    for route, count in sorted(counts.items()):
        if count < 1:
            continue
        cumulative = sorted(buckets.get(route, {}).items())
        p95 = next((le for le, n in cumulative if n >= 0.95 * count), None)
        found[route] = RouteTime(
            requests=round(count),
            mean_ms=round(sums.get(route, 0.0) / count * 1000, 2),
            p95_le_ms=None if p95 is None or p95 == float("inf") else p95 * 1000,
        )
    return found


def sample(url: str, plan: list[tuple[str, str]], rng: random.Random) -> Sample:
    statuses: dict[str, int] = {}
    degraded = 0
    picked = rng.choices(plan, k=SAMPLE_REQUESTS)
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        for target, key in picked:
            headers = {"Authorization": f"Bearer {key}"} if key != "-" else {}
            response = client.get(target, headers=headers)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            degraded += response.headers.get(STATUS_HEADER) == DEGRADED
    return Sample(
        requests=len(picked), ok_200=statuses.get("200", 0), degraded=degraded, statuses=statuses
    )


@dataclass
class Target:
    """What one phase loads: a server, its plan, and what its answers must say."""

    name: str
    server: str
    url: str
    pid: int
    plan: Path
    database_url: str | None = None
    redis_pid: int | None = None
    # None: the hello server (no metrics, no service status); else the status expected.
    expect_degraded: bool | None = None


def measure(target: Target, shape: LoadShape, deadline: Deadline, rng: random.Random) -> Phase:
    """A warm-up, then the measured run; the API's metrics around it and a sample of
    answers after it."""
    print(f"{target.name}: warming up {shape.warmup_s:g} s", file=sys.stderr, flush=True)
    if shape.warmup_s > 0:
        run_wrk(
            wrk_command(target.url, target.plan, shape, shape.warmup_s), shape.warmup_s, deadline
        )
    api = target.expect_degraded is not None
    before = scrape(target.url) if api else {}
    meter = CpuMeter(target.pid, target.database_url, target.redis_pid)
    command = wrk_command(target.url, target.plan, shape, shape.duration_s)
    meter.start()
    result = run_wrk(command, shape.duration_s, deadline)
    cores = meter.stop()
    after = scrape(target.url) if api else {}
    checked = sample(target.url, _plan_lines(target.plan), rng)
    seconds = result.duration_us / 1e6
    problems = _problems(result, checked, target.expect_degraded)
    lookups = {
        outcome: _delta(before, after, "accubooks_cache_requests_total", result=outcome)
        for outcome in ("hit", "miss", "error")
        if api
    }
    phase = Phase(
        name=target.name,
        server=target.server,
        wrk_command=" ".join([Path(command[0]).name, *command[1:]]),
        seconds=round(seconds, 2),
        requests=result.requests,
        req_per_s=round(result.requests / seconds, 1),
        ratio_to_hello=None,
        p50_ms=result.p50_us / 1000,
        p90_ms=result.p90_us / 1000,
        p95_ms=result.p95_us / 1000,
        p99_ms=result.p99_us / 1000,
        max_ms=result.max_us / 1000,
        mean_ms=round(result.mean_us / 1000, 3),
        non_2xx=result.status_errors,
        socket_errors=result.connect_errors
        + result.read_errors
        + result.write_errors
        + result.timeouts,
        bytes_per_request=round(result.bytes / max(1, result.requests), 1),
        cores=cores,
        cache_hits=lookups.get("hit"),
        cache_misses=lookups.get("miss"),
        cache_errors=lookups.get("error"),
        shed=_delta(before, after, "accubooks_shed_requests_total") if api else None,
        routes=route_times(before, after),
        sample=checked,
        expect_degraded=target.expect_degraded,
        ok=not problems,
        problems=problems,
    )
    print(
        f"{target.name}: {phase.req_per_s:,.0f} req/s, p95 {phase.p95_ms:.1f} ms,"
        f" p99 {phase.p99_ms:.1f} ms, non-2xx {phase.non_2xx}, socket errors"
        f" {phase.socket_errors}{'; ' + '; '.join(problems) if problems else ''}",
        file=sys.stderr,
        flush=True,
    )
    return phase


def _problems(result: Wrk, checked: Sample, expect_degraded: bool | None) -> list[str]:
    problems = []
    if result.requests == 0:
        problems.append("no request completed")
    if result.status_errors:
        problems.append(f"{result.status_errors} answers with status >= 400")
    errors = result.connect_errors + result.read_errors + result.write_errors + result.timeouts
    if errors:
        problems.append(f"{errors} socket errors or timeouts")
    if checked.ok_200 != checked.requests:
        problems.append(f"sampled answers not 200: {checked.statuses}")
    if expect_degraded is True and checked.degraded != checked.requests:
        problems.append(f"only {checked.degraded}/{checked.requests} sampled answers degraded")
    if expect_degraded is False and checked.degraded:
        problems.append(f"{checked.degraded}/{checked.requests} sampled answers degraded")
    return problems


# --- the report -----------------------------------------------------------------------------


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (
        (done.stdout or done.stderr).splitlines()[0].strip() if done.stdout or done.stderr else "?"
    )


def _postgres_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _loop_http() -> str:
    """What uvicorn's "auto" picks here: uvloop and httptools when installed."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    loop = "uvloop" if have["uvloop"] else "asyncio"
    http = "httptools" if have["httptools"] else "h11"
    return f"{loop} loop, {http}"


def machine_facts(admin_url: str, load_at_start: float, date: str) -> Machine:
    return Machine(
        nproc=len(os.sched_getaffinity(0)),
        cpu=_cpu_model(),
        loadavg_1m_at_start=load_at_start,
        loadavg_1m_at_end=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        postgres=_postgres_version(admin_url),
        redis=_version(["redis-server", "--version"]),
        wrk=_version(["wrk", "--version"]).split(" Copyright")[0],
        uvicorn=importlib.metadata.version("uvicorn"),
        uvicorn_loop_http=_loop_http(),
        date=date,
        git_head=git_head(),
    )


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _per_request_us(cores: float | None, req_per_s: float) -> float | None:
    return None if cores is None or not req_per_s else cores / req_per_s * 1e6


def render_markdown(report: Report) -> str:
    m, s = report.machine, report.seeding
    lines = [
        "# Read path: the seed's read mix on PostgreSQL + Redis, cache on, off, Redis stopped",
        "",
        f"`{report.command}` — {'ok' if report.ok else '**FAILED** (see problems)'}",
        "",
        f"wrk, {report.connections} connections, {report.threads} threads,"
        f" {report.duration_s:g} s per phase after a {report.warmup_s:g} s warm-up; one"
        " `accubooks api` process; the hello baseline is a bare Starlette JSON endpoint served"
        " the same way (uvicorn, one process), measured before and after, the ratio taken"
        f" to their mean ({report.hello_req_per_s:,.0f} req/s).",
        "",
        "| phase | req/s | ratio to hello | p50 ms | p95 ms | p99 ms | max ms | non-2xx"
        " | socket errors | cache hit % (lookups per request) | sampled: 200 / degraded |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.phases:
        looked = (p.cache_hits or 0) + (p.cache_misses or 0) + (p.cache_errors or 0)
        hit = (
            "-"
            if p.cache_hits is None or not looked
            else f"{100 * p.cache_hits / looked:.1f} ({looked / p.requests:.2f})"
        )
        sampled = "-" if p.sample is None else f"{p.sample.ok_200}/{p.sample.requests}"
        if p.sample is not None and p.expect_degraded is not None:
            sampled += f" / {p.sample.degraded}"
        lines.append(
            f"| {p.name} | {p.req_per_s:,.0f} | {_f(p.ratio_to_hello, 3)} | {p.p50_ms:.2f}"
            f" | {p.p95_ms:.2f} | {p.p99_ms:.2f} | {p.max_ms:.1f} | {p.non_2xx}"
            f" | {p.socket_errors} | {hit} | {sampled} |"
        )
    lines += [
        "",
        "Cache lookups are counted by the API (hit, miss, error); concurrent requests for"
        " one key share one lookup (single-flight), so there are fewer lookups than"
        " requests. The sample: the mix's requests fetched one by one with httpx2 right"
        " after the phase, the number answered 200 and the number marked"
        " `X-Service-Status: degraded` (expected on every answer with Redis stopped, on none"
        " otherwise).",
        "",
        "CPU cores used during each measured run (CPU s per wall s; the machine has"
        f" {m.nproc}): the server process (and its CPU per answered request), its"
        " PostgreSQL backends, Redis, wrk, the whole machine, and what is left of it for"
        " processes outside this run. A server near 1 core is one Python process's ceiling"
        " (one GIL): its CPU per request then sets its throughput.",
        "",
        "| phase | server | server CPU µs/request | PostgreSQL | Redis | wrk | machine | other"
        " | bytes/request |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.phases:
        c = p.cores
        lines.append(
            f"| {p.name} | {_f(c.server, 2)} | {_f(_per_request_us(c.server, p.req_per_s), 0)}"
            f" | {_f(c.postgres, 2)} | {_f(c.redis, 2)}"
            f" | {c.wrk:.2f} | {c.machine:.2f} | {c.other:.2f} | {p.bytes_per_request:,.0f} |"
        )
    api_phases = [p for p in report.phases if p.routes]
    if api_phases:
        lines += [
            "",
            "Server-side time per route (the API's own histogram, from the request reaching"
            " the app to its answer; wrk's figures add the socket and the event loop's"
            " queue): mean ms, and the bucket holding p95.",
            "",
            "| route | " + " | ".join(f"{p.name}: n, mean, p95 <=" for p in api_phases) + " |",
            "|---|" + "--:|" * len(api_phases),
        ]
        routes = sorted({r for p in api_phases for r in p.routes})
        for route in routes:
            cells = []
            for p in api_phases:
                t = p.routes.get(route)
                cells.append(
                    "-" if t is None else f"{t.requests:,}, {t.mean_ms:.2f}, {_f(t.p95_le_ms, 1)}"
                )
            lines.append(f"| {route} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The mix (share of requests): "
        + ", ".join(f"{name} {weight} %" for name, weight in report.mix.items())
        + f"; over all {s.tenants} tenants' reader keys, ids drawn uniformly; scenario list"
        f" pages 1-5 of {PAGE_LIMIT} (70 % page 1), forecast list page 1 or filtered by a"
        " scenario. The seed names these endpoints but gives no weights: the weights are"
        " ours.",
        "",
        f"Data, seeded through the log (tenant commands, then the aggregates as the commands"
        f" and the job worker save them): {s.tenants} tenants, {s.scenarios:,} scenarios"
        f" ({s.archived:,} archived), forecasts {s.forecasts_completed:,} completed"
        f" ({FORECAST_MONTHS} months x {FORECAST_PATHS} paths, the real model),"
        f" {s.forecasts_failed:,} failed, {s.forecasts_queued} queued; {s.events:,} events"
        f" written in {s.write_s:.1f} s; `accubooks project` caught up in {s.catch_up_s:.1f} s"
        f" ({s.catch_up_events_per_s:,.0f} events/s) and was stopped before the phases.",
        "",
        "The API process: "
        + ", ".join(f"`{k}={v}`" for k, v in report.api_env.items())
        + "; a fresh process per phase. The Redis-stopped one starts with Redis up, which is"
        " then killed (SIGKILL) under it; its warm-up covers the circuit breaker opening."
        " wrk's latency is closed-loop (a slow answer delays that"
        " connection's next request, so the tail is understated, not overstated); non-2xx"
        " counts answers with a status of 400 or more.",
    ]
    for p in report.phases:
        lines.append(f"- {p.name}: `{p.wrk_command}`")
    if report.problems:
        lines += ["", "Problems:", *(f"- {problem}" for problem in report.problems)]
    lines += [
        "",
        f"Machine: nproc {m.nproc} ({m.cpu}), load average (1 min) {m.loadavg_1m_at_start} at"
        f" start and {m.loadavg_1m_at_end} at end, Python {m.python}, PostgreSQL {m.postgres},"
        f" {m.redis}, {m.wrk}, uvicorn {m.uvicorn} ({m.uvicorn_loop_http}); {m.date};"
        f" git HEAD {m.git_head}. wrk, the server, PostgreSQL and Redis share the machine's"
        " cores.",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# --- the run --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.read_bench", description=__doc__)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--scenarios", type=int, default=200, help="per tenant")
    parser.add_argument("--forecasts", type=int, default=2, help="per scenario")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--duration-s", type=float, default=20.0, help="per measured phase")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="before each phase")
    parser.add_argument("--plan", type=int, default=20_000, help="requests drawn for the mix")
    parser.add_argument("--max-in-flight", type=int, default=256)
    # The service's defaults: this process is CPU-bound on one core, and 4+0 to 20+20
    # connections measured the same within the machine's noise.
    parser.add_argument("--db-pool-size", type=int, default=5)
    parser.add_argument("--db-pool-max-overflow", type=int, default=10)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the API's ACCUBOOKS_LOG_LEVEL (INFO, the default, logs a line per request)",
    )
    parser.add_argument("--seed", type=int, default=1, help="of the mix's random draws")
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.connections < args.threads or min(args.tenants, args.scenarios, args.forecasts) < 1:
        raise SystemExit("need tenants, scenarios, forecasts >= 1 and connections >= threads")
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y {tool}")
    _stop_on_signals()
    deadline = Deadline(time.monotonic() + args.budget_s)
    load_at_start = round(os.getloadavg()[0], 2)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    rng = random.Random(args.seed)
    shape = LoadShape(
        connections=args.connections,
        threads=args.threads,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        timeout_s=REQUEST_TIMEOUT_S,
    )
    api_env = {
        "ACCUBOOKS_MAX_IN_FLIGHT": str(args.max_in_flight),
        "ACCUBOOKS_DB_POOL_SIZE": str(args.db_pool_size),
        "ACCUBOOKS_DB_POOL_MAX_OVERFLOW": str(args.db_pool_max_overflow),
        "ACCUBOOKS_LOG_LEVEL": args.log_level,
    }
    phases: list[Phase] = []
    problems: list[str] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="read_bench_"))
        database_url = stack.enter_context(postgres_database(args.admin_url))
        cache = stack.enter_context(private_redis(tmp, deadline))

        log = open_event_log(Settings(database_url=database_url))
        try:
            started = time.perf_counter()
            counts, reads = seed(
                log,
                tenants=args.tenants,
                scenarios=args.scenarios,
                forecasts=args.forecasts,
                deadline=deadline,
            )
            write_s = time.perf_counter() - started
            end = log.position()
        finally:
            log.close()
        print(f"seeded {end:,} events in {write_s:.1f} s", file=sys.stderr, flush=True)
        catch_up_s = project_until_caught_up(database_url, cache.url, end, deadline)
        print(f"read models caught up in {catch_up_s:.1f} s", file=sys.stderr, flush=True)
        seeding = Seeding(
            tenants=args.tenants,
            scenarios=counts.scenarios,
            archived=counts.archived,
            forecasts_completed=counts.completed,
            forecasts_failed=counts.failed,
            forecasts_queued=counts.queued,
            events=end,
            write_s=round(write_s, 2),
            catch_up_s=round(catch_up_s, 2),
            catch_up_events_per_s=round(end / catch_up_s, 1),
        )
        plan = Path(tmp) / "mix.tsv"
        write_plan(plan, reads, args.plan, rng)
        hello_plan = Path(tmp) / "hello.tsv"
        hello_plan.write_text("hello\t/\t-\n")

        def hello(name: str) -> Phase:
            with hello_server(deadline) as (url, pid):
                target = Target(name=name, server="hello", url=url, pid=pid, plan=hello_plan)
                return measure(target, shape, deadline, rng)

        def api(name: str, extra: dict[str, str], degraded: bool) -> Phase:
            with api_process(database_url, {**api_env, **extra}, deadline) as (url, pid):
                redis_pid = cache.proc.pid if not degraded else None
                if degraded:
                    cache.kill()
                target = Target(
                    name=name,
                    server="accubooks api",
                    url=url,
                    pid=pid,
                    plan=plan,
                    database_url=database_url,
                    redis_pid=redis_pid,
                    expect_degraded=degraded,
                )
                return measure(target, shape, deadline, rng)

        try:
            phases.append(hello("hello (before)"))
            phases.append(api("cache on", {"REDIS_URL": cache.url}, degraded=False))
            off = {"REDIS_URL": cache.url, "ACCUBOOKS_CACHE_ENABLED": "false"}
            phases.append(api("cache off", off, degraded=False))
            # Started with Redis up, which is then killed under it, as a crash would.
            phases.append(api("Redis stopped", {"REDIS_URL": cache.url}, degraded=True))
            phases.append(hello("hello (after)"))
        except (SystemExit, httpx.HTTPError) as e:
            # The budget ran out, a process failed or stopped answering: report what was
            # measured.
            problems.append(f"stopped early: {e.code if isinstance(e, SystemExit) else e!r}")

    hellos = [p.req_per_s for p in phases if p.server == "hello"]
    hello_mean = sum(hellos) / len(hellos) if hellos else 0.0
    phases = [
        msgspec.structs.replace(
            p, ratio_to_hello=round(p.req_per_s / hello_mean, 3) if hello_mean else None
        )
        for p in phases
    ]
    problems += [f"{p.name}: {problem}" for p in phases for problem in p.problems]
    if len(phases) < 5:
        problems.append(f"only {len(phases)} of 5 phases measured")
    report = Report(
        ok=not problems,
        command=" ".join([".venv/bin/python -m perf.read_bench", *(argv or sys.argv[1:])]),
        machine=machine_facts(args.admin_url, load_at_start, date),
        seeding=seeding,
        mix=MIX,
        connections=args.connections,
        threads=args.threads,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        api_env={**api_env, "REDIS_URL": "redis://127.0.0.1:<private port>/0"},
        hello_req_per_s=round(hello_mean, 1),
        phases=phases,
        problems=problems,
    )
    markdown = render_markdown(report)
    REPORTS.mkdir(parents=True, exist_ok=True)
    _write(REPORTS / "read_path.md", markdown.encode())
    _write(REPORTS / "read_path.json", msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    print(markdown)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
