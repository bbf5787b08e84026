"""Projection workers as real `accubooks project` processes: every command of concurrent
writers applied exactly once by a live worker, recovery after a SIGKILL that matches a
rebuild from position 0 row for row, and a second process that waits on the projection
lock and takes over when the active one dies. Every wait is bounded; every process is
killed in a finally."""

from __future__ import annotations

import functools
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from commands import forecasts, messages, scenarios, tenants
from commands.context import Collaborators, CommandContext
from domain import scenario_spec as spec
from domain.events import Actor, Attributed
from domain.forecast import Forecast
from domain.receipt import CommandReceipt
from domain.scenario import Scenario
from infra import locks, wire
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log, projection_file
from infra.readstore import ReadStore
from infra.settings import Settings
from projections import forecasts as forecasts_model
from projections.runner import ProjectionRunner
from service import wiring
from tests.conftest import scenario_body
from tests.services import postgres_database

ROOT = Path(__file__).resolve().parents[2]
PROJECTIONS = tuple(projector.name for projector in wiring.projectors())
# The bound of every single wait (a process starting, a catch-up, a rebuild): a hung
# worker fails the test instead of hanging the suite.
DEADLINE_S = 60.0
# Catching up on 50,000 events took 25-60 s on this 2-core machine (shared with other
# test runs); the bound leaves room for a slower day.
CATCH_UP_S = 240.0
POLL_S = 0.01
KILLS = 4  # SIGKILLs of the projection worker during one catch-up

TYPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("HIRING", {"headcount": 2, "monthlyCostPerHead": "6500", "startOffsetMonths": 1}),
    ("COST_REDUCTION", {"percent": 10}),
    ("REVENUE_INCREASE", {"percent": 5}),
    ("PRICE_CHANGE", {"percent": 3, "churnPercent": 1}),
    ("CUSTOM", {"revenuePercent": 1, "costPercent": 2, "oneOffCash": "1000"}),
)
BASELINE = spec.baseline_from_payload(
    {
        "startMonth": "2026-01",
        "openingCash": "250000.00",
        "monthlyRevenue": "40000.00",
        "monthlyCosts": "35000.50",
        "revenueGrowthRate": 0.02,
        "costGrowthRate": 0.01,
    }
)
ASSUMPTIONS = [spec.assumptions_from_payload({"type": t, **a}) for t, a in TYPES]


# --- what the test wrote, counted apart from the projections ------------------------------


@dataclass
class ScenarioFacts:
    tenant_id: str
    type: str
    name: str
    version: int = 1
    forecasts: int = 0
    archived: bool = False


@dataclass
class Written:
    scenarios: dict[str, ScenarioFacts] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)  # per tenant, events appended
    commands: Counter[str] = field(default_factory=Counter)  # per tenant, receipts

    def merge(self, other: Written) -> None:
        self.scenarios.update(other.scenarios)
        self.events.update(other.events)
        self.commands.update(other.commands)


def logged(log: EventLog) -> Written:
    """Events and receipts per tenant as the log holds them."""
    found = Written()
    position = 0
    while True:
        page = log.recorder.select_notifications(
            start=position, limit=1000, inclusive_of_start=False
        )
        if not page:
            return found
        for notification in page:
            event = log.mapper.to_domain_event(notification)
            assert isinstance(event, Attributed), f"unattributed event at {notification.id}"
            found.events[str(event.tenant_id)] += 1
            if isinstance(event, CommandReceipt.Recorded):
                found.commands[str(event.tenant_id)] += 1
        position = page[-1].id


def operator(log: EventLog) -> Collaborators:
    return Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)


def new_tenants(log: EventLog, count: int, written: Written) -> list[uuid.UUID]:
    ids = [tenants.create_tenant(operator(log), f"Tenant {n}").tenant_id for n in range(count)]
    for tenant_id in ids:
        written.events[str(tenant_id)] += 1  # Tenant.Registered
    return ids


def write_bulk(log: EventLog, *, events: int, tenant_count: int = 3) -> Written:
    """About ``events`` events, 100 aggregates per save: per scenario a creation and a
    rename, two forecast requests, and every tenth scenario archived afterwards."""
    written = Written()
    tenant_ids = new_tenants(log, tenant_count, written)
    appended = tenant_count
    pending: list[Scenario | Forecast] = []
    index = 0
    while appended < events or pending:
        if appended >= events or len(pending) >= 100:
            log.save(*pending)
            pending.clear()
            continue
        tenant_id = tenant_ids[index % tenant_count]
        actor = Actor(tenant_id=tenant_id, actor_id="bulk", request_id=f"bulk-{index}")
        now = utc_now()
        scenario = Scenario.create(
            actor,
            scenario_id=uuid.uuid4(),
            name=f"Scenario {index}",
            baseline=BASELINE,
            assumptions=ASSUMPTIONS[index % len(ASSUMPTIONS)],
            at=now,
        )
        scenario.update(actor, name=f"Scenario {index} renamed", at=now)
        requested = [
            Forecast.request(
                actor,
                forecast_id=uuid.uuid4(),
                scenario=scenario,
                horizon_months=12,
                paths=100,
                at=now,
            )
            for _ in range(2)
        ]
        archived = index % 10 == 0
        if archived:
            scenario.archive(actor, at=now)
        pending.extend([scenario, *requested])
        written.scenarios[str(scenario.id)] = ScenarioFacts(
            tenant_id=str(tenant_id),
            type=TYPES[index % len(TYPES)][0],
            name=scenario.name,
            version=scenario.version,
            forecasts=len(requested),
            archived=archived,
        )
        added = scenario.version + len(requested)
        written.events[str(tenant_id)] += added
        appended += added
        index += 1
    return written


# --- reading the read models ----------------------------------------------------------------


def rows(
    store: ReadStore, projection: str, sql: str, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    return [dict(row) for row in store.query(projection, sql, params)]


def positions(store: ReadStore) -> dict[str, int]:
    """Each projection's tracking position, as committed with its rows."""
    found: dict[str, int] = {}
    for name in PROJECTIONS:
        result = store.query(
            name,
            f"SELECT MAX(notification_id) AS position FROM {store.tracking_table(name)}"
            " WHERE application_name = ?",
            [EventLog.name],
        )
        found[name] = int(result[0]["position"] or 0)
    return found


def assert_exact(store: ReadStore, written: Written) -> None:
    """Every count of every read model equals what was written: none skipped, none twice."""
    assert_scenarios_exact(store, written)
    assert_forecasts_exact(store, written)
    assert_dashboard_exact(store, written)
    assert_usage_exact(store, written)


def scenarios_per_tenant(written: Written) -> Counter[str]:
    return Counter(facts.tenant_id for facts in written.scenarios.values())


def forecasts_per_tenant(written: Written) -> Counter[str]:
    counted: Counter[str] = Counter()
    for facts in written.scenarios.values():
        counted[facts.tenant_id] += facts.forecasts
    return counted


def assert_scenarios_exact(store: ReadStore, written: Written) -> None:
    expected = dict(scenarios_per_tenant(written))
    totals = rows(store, "scenarios", "SELECT tenant_id, total FROM scenarios_tenants")
    assert {r["tenant_id"]: r["total"] for r in totals} == expected, "scenarios_tenants.total"
    counted = rows(
        store, "scenarios", "SELECT tenant_id, COUNT(*) AS n FROM scenarios_rows GROUP BY tenant_id"
    )
    assert {r["tenant_id"]: r["n"] for r in counted} == expected, "scenarios_rows per tenant"
    found = rows(
        store,
        "scenarios",
        "SELECT id, tenant_id, name, type, status, version, forecast_count FROM scenarios_rows",
    )
    assert {r["id"]: tuple(list(r.values())[1:]) for r in found} == {
        scenario_id: (
            facts.tenant_id,
            facts.name,
            facts.type,
            "archived" if facts.archived else "active",
            facts.version,
            facts.forecasts,
        )
        for scenario_id, facts in written.scenarios.items()
    }, "scenarios_rows: name, status, version or forecast_count"


def assert_forecasts_exact(store: ReadStore, written: Written) -> None:
    per_scenario = rows(
        store,
        "forecasts",
        "SELECT scenario_id, scenario_name, COUNT(*) AS n FROM forecasts_rows"
        " GROUP BY scenario_id, scenario_name",
    )
    assert {r["scenario_id"]: (r["scenario_name"], r["n"]) for r in per_scenario} == {
        scenario_id: (facts.name, facts.forecasts)
        for scenario_id, facts in written.scenarios.items()
        if facts.forecasts
    }, "forecasts_rows per scenario, with the scenario's latest name"
    totals = rows(
        store,
        "forecasts",
        "SELECT tenant_id, n FROM forecasts_counts WHERE scenario_id = ? AND status = ?",
        [forecasts_model.ANY, forecasts_model.ANY],
    )
    assert {r["tenant_id"]: r["n"] for r in totals} == dict(forecasts_per_tenant(written))


def assert_dashboard_exact(store: ReadStore, written: Written) -> None:
    expected: dict[str, tuple[Any, ...]] = {}
    for tenant_id, total in scenarios_per_tenant(written).items():
        facts = [f for f in written.scenarios.values() if f.tenant_id == tenant_id]
        archived = sum(f.archived for f in facts)
        forecasts_total = sum(f.forecasts for f in facts)
        by_type = dict(Counter(f.type for f in facts))
        expected[tenant_id] = (
            total,
            total - archived,
            archived,
            forecasts_total,
            forecasts_total,
            by_type,
        )
    found = rows(
        store,
        "dashboard",
        "SELECT tenant_id, scenarios_total, scenarios_active, scenarios_archived,"
        " forecasts_total, forecasts_queued, by_type FROM dashboard_tenants",
    )
    assert {
        r["tenant_id"]: (*list(r.values())[1:-1], json.loads(r["by_type"])) for r in found
    } == expected, "dashboard_tenants counters"


def assert_usage_exact(store: ReadStore, written: Written) -> None:
    created, requested = scenarios_per_tenant(written), forecasts_per_tenant(written)
    found = rows(
        store,
        "usage",
        "SELECT tenant_id, SUM(scenarios_created) AS scenarios, SUM(forecasts_requested)"
        " AS forecasts, SUM(commands_accepted) AS commands, SUM(events_appended) AS events"
        " FROM usage_months GROUP BY tenant_id",
    )
    assert {r["tenant_id"]: tuple(int(v) for v in list(r.values())[1:]) for r in found} == {
        tenant_id: (created[tenant_id], requested[tenant_id], written.commands[tenant_id], events)
        for tenant_id, events in written.events.items()
    }, "usage_months: scenarios, forecasts, commands accepted, events appended"


def dump(store: ReadStore) -> dict[str, list[tuple[Any, ...]]]:
    """All rows of every read-model table, ordered by primary key."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    for projector in wiring.projectors():
        for table in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", " ".join(projector.ddl())):
            key = ", ".join(primary_key(store, projector.name, table))
            found = store.query(projector.name, f"SELECT * FROM {table} ORDER BY {key}")
            tables[table] = [tuple(dict(row).values()) for row in found]
    return tables


def primary_key(store: ReadStore, projection: str, table: str) -> list[str]:
    if store.postgres:
        sql = (
            "SELECT a.attname AS name FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = CAST(? AS regclass) AND i.indisprimary"
            " ORDER BY array_position(CAST(i.indkey AS int2[]), a.attnum)"
        )
    else:
        sql = "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk"
    names = [str(row["name"]) for row in store.query(projection, sql, [table])]
    assert names, f"{table} has no primary key"
    return names


def assert_same_rows(
    live: Mapping[str, Sequence[tuple[Any, ...]]], rebuilt: Mapping[str, Sequence[tuple[Any, ...]]]
) -> None:
    assert live.keys() == rebuilt.keys()
    for table, mine in live.items():
        theirs = rebuilt[table]
        first = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None
        )
        assert first is None, f"{table} row {first}: live {mine[first]} != rebuilt {theirs[first]}"
        assert len(mine) == len(theirs), f"{table}: {len(mine)} live rows, {len(theirs)} rebuilt"
        assert mine, f"{table} is empty: the comparison would prove nothing"


@contextmanager
def store_of(settings: Settings) -> Iterator[ReadStore]:
    store = ReadStore(settings)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def rebuild(settings: Settings, log: EventLog) -> Iterator[Rebuild]:
    """In-process workers rebuilding the read models from position 0 of ``log`` into an
    empty second location (another database, or another data folder), started at once
    so that they run while the test drives its processes."""
    with ExitStack() as stack:
        if settings.database_url:
            target = Settings(
                database_url=stack.enter_context(postgres_database()),
                data_dir=settings.data_dir + "-rebuild",
            )
        else:
            target = Settings(data_dir=settings.data_dir + "-rebuild")
        runner = ProjectionRunner(target, log, wiring.projectors())
        runner.start()
        stack.callback(runner.stop)
        yield Rebuild(target, runner, stack)


@dataclass
class Rebuild:
    target: Settings
    runner: ProjectionRunner
    stack: ExitStack

    def finished_store(self, position: int) -> ReadStore:
        """The rebuilt read models once they reach ``position``."""
        reached = self.runner.wait_for(position, CATCH_UP_S)
        assert reached, f"the rebuild did not reach {position} in {CATCH_UP_S}s"
        return self.stack.enter_context(store_of(self.target))


# --- `accubooks project` processes ----------------------------------------------------------


@dataclass
class Project:
    label: str
    proc: subprocess.Popen[str]
    stderr: IO[str]

    def output(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def started(self) -> dict[str, Any]:
        """The process's first line, once it has built its workers (bounded)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE_S)
        assert ready, f"{self.label} printed nothing in {DEADLINE_S}s: {self.output()}"
        line = self.proc.stdout.readline()
        assert line, f"{self.label} exited ({self.proc.poll()}) before starting: {self.output()}"
        first: dict[str, Any] = json.loads(line)
        assert first == {"projections": list(PROJECTIONS), "pid": self.proc.pid}
        return first

    def kill(self) -> None:
        """SIGKILL: no clean stop, a batch in flight is cut wherever it is."""
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)


def process_env(settings: Settings, label: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ACCUBOOKS_")
        and name not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "PGAPPNAME")
    }
    env["ACCUBOOKS_DATA_DIR"] = settings.data_dir
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
        # libpq names every session of the process: pg_stat_activity tells them apart.
        env["PGAPPNAME"] = label
    return env


@contextmanager
def project_process(settings: Settings, label: str = "project") -> Iterator[Project]:
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "project", "--json"],
            cwd=ROOT,
            env=process_env(settings, label),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            yield Project(label, proc, stderr)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()


def wait_until(
    condition: Callable[[], bool],
    what: str,
    running: Sequence[Project] = (),
    timeout_s: float = DEADLINE_S,
) -> None:
    """Polls ``condition`` until it holds; fails at the deadline or when a process that
    should be running has exited."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not condition():
        for project in running:
            code = project.proc.poll()
            assert code is None, f"{project.label} exited ({code}): {project.output()}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        pause.wait(POLL_S)


def caught_up(store: ReadStore, position: int) -> Callable[[], bool]:
    return lambda: all(p == position for p in positions(store).values())


def lock_holders(settings: Settings, store: ReadStore, projects: Sequence[Project]) -> list[str]:
    """``projection:label`` for each projection lock held by one of ``projects``."""
    # The advisory lock keys are the coordination module's own (private) derivation.
    keys = {locks.lock_key(f"projection.{name}"): name for name in PROJECTIONS}
    held: list[str] = []
    if settings.database_url:
        found = store.query(
            PROJECTIONS[0],
            "SELECT a.application_name AS holder, l.classid, l.objid FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        for row in found:
            key = (int(row["classid"]) << 32) | int(row["objid"])
            name = keys.get(key - (1 << 64) if key >= 1 << 63 else key)
            if name is not None:
                held.append(f"{name}:{row['holder']}")
        return held
    # SQLite: flock() on projections/<name>.lock; /proc/locks names the owner's pid.
    files: dict[tuple[int, int, int], str] = {}
    for name in PROJECTIONS:
        path = os.path.join(os.path.dirname(projection_file(settings, name)), f"{name}.lock")
        if os.path.exists(path):
            st = os.stat(path)
            files[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = name
    labels = {project.proc.pid: project.label for project in projects}
    with open("/proc/locks") as table:
        for line in table:
            parts = line.split()
            if parts[1] != "FLOCK":
                continue  # POSIX locks (SQLite's own), or "->" for a blocked waiter
            major, minor, inode = parts[5].split(":")
            name = files.get((int(major, 16), int(minor, 16), int(inode)))
            if name is not None:
                held.append(f"{name}:{labels.get(int(parts[4]), parts[4])}")
    return held


def at_once(count: int, call: Callable[[], Any]) -> list[str | None]:
    """What each of ``count`` threads released together got from ``call()``: None, or the
    error it raised. Whatever ``call`` returns is closed or stopped."""
    barrier = threading.Barrier(count, timeout=DEADLINE_S)

    def released(_: int) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(released, n) for n in range(count)]
        failures = [future.exception(timeout=DEADLINE_S) for future in futures]
    for future, failure in zip(futures, failures, strict=True):
        opened = None if failure is not None else future.result()
        if isinstance(opened, ProjectionRunner):
            opened.stop()
        elif isinstance(opened, EventLog):
            opened.close()
    return [None if failure is None else repr(failure) for failure in failures]


# --- the tests ------------------------------------------------------------------------------


WRITERS = 8
COMMANDS_PER_WRITER = 500
CREATES_PER_WRITER = 25
# The writers share one GIL and every save takes the events table's lock: 8 x 500 commands
# take 15-50 s on a 2-core machine, depending on what else runs there.
WRITERS_DEADLINE_S = 180.0


def write_commands(deps: Collaborators, tenant_id: uuid.UUID, writer: int) -> Written:
    """One writer's commands through the public handlers: a few creates, then renames and
    forecast requests on them, each with its own idempotency key."""
    written = Written()
    tenant = str(tenant_id)
    scenario_type, assumptions = TYPES[writer % 2]
    ids: list[uuid.UUID] = []
    for n in range(COMMANDS_PER_WRITER):
        key = f"writer-{writer}-{n}"
        ctx = CommandContext(
            actor=Actor(tenant_id=tenant_id, actor_id=f"writer-{writer}", request_id=key),
            idempotency_key=key,
        )
        if n < CREATES_PER_WRITER:
            name = f"writer {writer} scenario {n}"
            body = scenario_body(name=name, type=scenario_type, assumptions=assumptions)
            reply = scenarios.create_scenario(
                deps, ctx, wire.decode(json.dumps(body).encode(), messages.CreateScenarioBody)
            )
            assert reply.status == 201, reply.body
            ids.append(uuid.UUID(json.loads(reply.body)["id"]))
            written.scenarios[str(ids[-1])] = ScenarioFacts(tenant, scenario_type, name)
        else:
            scenario_id = ids[n % len(ids)]
            facts = written.scenarios[str(scenario_id)]
            if n % 2:
                reply = forecasts.request_forecast(
                    deps,
                    ctx,
                    messages.GenerateForecastBody(
                        scenario_id=scenario_id, horizon_months=12, paths=100
                    ),
                )
                assert reply.status == 202, reply.body
                facts.forecasts += 1
            else:
                facts.name = f"writer {writer} scenario {n % len(ids)} as of {n}"
                reply = scenarios.update_scenario(
                    deps, ctx, scenario_id, messages.UpdateScenarioBody(name=facts.name), None
                )
                assert reply.status == 200, reply.body
                facts.version += 1
        written.commands[tenant] += 1
        written.events[tenant] += 2  # the command's one event and its receipt
    return written


def test_live_worker_applies_every_command_of_eight_concurrent_writers_exactly_once(
    postgres_settings: Settings,
) -> None:
    log = open_event_log(postgres_settings)
    try:
        written = Written()
        tenant_ids = new_tenants(log, 2, written)
        deps = operator(log)
        with project_process(postgres_settings) as project:
            project.started()
            barrier = threading.Barrier(WRITERS, timeout=DEADLINE_S)

            def writer(index: int) -> Written:
                barrier.wait()
                return write_commands(deps, tenant_ids[index % len(tenant_ids)], index)

            deadline = time.monotonic() + WRITERS_DEADLINE_S
            with ThreadPoolExecutor(max_workers=WRITERS) as pool:
                futures = [pool.submit(writer, index) for index in range(WRITERS)]
                for future in futures:
                    written.merge(future.result(timeout=max(0.0, deadline - time.monotonic())))
            assert logged(log) == Written(events=written.events, commands=written.commands)
            assert sum(written.commands.values()) == WRITERS * COMMANDS_PER_WRITER
            end = log.position()
            with store_of(postgres_settings) as store:
                wait_until(caught_up(store, end), f"every projection reaches {end}", [project])
                assert_exact(store, written)
    finally:
        log.close()


def test_worker_killed_repeatedly_mid_catch_up_ends_with_the_same_rows_as_a_rebuild(
    settings: Settings, event_log: EventLog
) -> None:
    written = write_bulk(event_log, events=50_000)
    end = event_log.position()
    kills: list[dict[str, int]] = []
    with rebuild(settings, event_log) as rebuilt, store_of(settings) as store:
        before = dict.fromkeys(PROJECTIONS, 0)
        for round_ in range(KILLS):
            with project_process(settings, f"project-{round_}") as worker:
                worker.started()

                def moved(before: dict[str, int] = before) -> bool:
                    now = positions(store)
                    return any(now[name] > before[name] for name in now) or all(
                        p == end for p in now.values()
                    )

                wait_until(moved, "the worker applying a batch", [worker], CATCH_UP_S)
                worker.kill()
            at_kill = positions(store)
            if all(p == end for p in at_kill.values()):
                break  # caught up before this kill: nothing more to interrupt
            kills.append(at_kill)
            before = at_kill
        assert kills, "the worker caught up before the first kill"
        with project_process(settings, "project-last") as last:
            last.started()
            wait_until(caught_up(store, end), f"reaching {end}", [last], CATCH_UP_S)
        assert_exact(store, written)
        fresh = rebuilt.finished_store(end)
        assert positions(fresh) == positions(store)
        assert_same_rows(dump(store), dump(fresh))
    print(
        f"projection worker SIGKILLed {len(kills)} times mid catch-up (positions {kills});"
        f" the rows equal a rebuild from position 0"
    )


def test_second_process_waits_on_the_lock_and_takes_over_when_the_first_dies(
    settings: Settings, event_log: EventLog
) -> None:
    written = write_bulk(event_log, events=20_000)
    end = event_log.position()
    with ExitStack() as stack:
        store = stack.enter_context(store_of(settings))
        a = stack.enter_context(project_process(settings, "project-a"))
        a.started()
        b = stack.enter_context(project_process(settings, "project-b"))
        b.started()
        both = [a, b]

        def every_lock_held() -> bool:
            held = lock_holders(settings, store, both)
            return sorted(h.split(":")[0] for h in held) == sorted(PROJECTIONS)

        wait_until(every_lock_held, "every projection's lock is held", both)
        holders: dict[str, str] = {}
        for held in lock_holders(settings, store, both):
            name, label = held.split(":")
            assert name not in holders, f"{name} is held twice"
            holders[name] = label
        assert set(holders.values()) <= {a.label, b.label}, holders
        active, survivor = (a, b) if holders[PROJECTIONS[0]] == a.label else (b, a)

        def mid_catch_up() -> bool:
            position = positions(store)[PROJECTIONS[0]]
            assert position < end, f"{PROJECTIONS[0]} caught up before the kill"
            return position > 0

        wait_until(mid_catch_up, f"{PROJECTIONS[0]} has applied some events", both)
        active.kill()

        def survivor_holds_every_lock() -> bool:
            held = lock_holders(settings, store, [survivor])
            return sorted(held) == sorted(f"{name}:{survivor.label}" for name in PROJECTIONS)

        wait_until(survivor_holds_every_lock, "the survivor holds every lock", [survivor])
        wait_until(caught_up(store, end), f"the survivor reaches {end}", [survivor], CATCH_UP_S)
        assert_exact(store, written)


def test_workers_opening_a_fresh_store_at_once_all_start(
    settings: Settings, tmp_path: Path
) -> None:
    """Each `accubooks project` process builds its runner (and so the read-model tables) at
    startup; threads stand in for processes here because the race is in the store, and
    threads released together hit it every time where processes hit it now and then."""
    for attempt in range(3):
        with ExitStack() as stack:
            if settings.database_url:
                url = stack.enter_context(postgres_database())
                fresh = Settings(database_url=url, data_dir=str(tmp_path / f"{attempt}"))
            else:
                fresh = Settings(data_dir=str(tmp_path / f"{attempt}"))
            log = open_event_log(fresh)
            stack.callback(log.close)
            failures = at_once(4, functools.partial(wiring.projection_runner, fresh, log))
            assert failures == [None] * 4, failures


def test_processes_opening_an_existing_event_log_at_once_all_open(
    postgres_settings: Settings,
) -> None:
    open_event_log(postgres_settings).close()
    for _ in range(3):
        failures = at_once(4, functools.partial(open_event_log, postgres_settings))
        assert failures == [None] * 4, failures
