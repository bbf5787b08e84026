"""Seeding a benchmark's data the way the service writes it, never as read-model rows:
tenants and keys through the tenant commands, scenarios and forecasts saved through the
event log as the commands and the job worker save them; then `accubooks project` until
every read model has caught up."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg

from commands import tenants as tenant_commands
from commands.context import Collaborators
from domain import forecast_model
from domain import scenario_spec as spec
from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from infra.clock import utc_now
from infra.eventstore import EventLog
from perf.harness import Deadline
from perf.processes import Process, accubooks
from service import wiring

SCENARIO_BODY = msgspec.json.encode(
    {
        "name": "Hire two engineers",
        "type": "HIRING",
        "baseline": {
            "startMonth": "2026-01",
            "openingCash": "250000.00",
            "monthlyRevenue": "40000",
            "monthlyCosts": "35000.50",
            "revenueGrowthRate": 0.02,
            "costGrowthRate": 0.01,
        },
        "assumptions": {"headcount": 2, "monthlyCostPerHead": "6500", "startOffsetMonths": 1},
    }
)
BASELINE = spec.baseline_from_payload(msgspec.json.decode(SCENARIO_BODY)["baseline"])
ASSUMPTIONS = [
    spec.assumptions_from_payload(payload)
    for payload in (
        {"type": "HIRING", "headcount": 2, "monthlyCostPerHead": "6500"},
        {"type": "COST_REDUCTION", "percent": 10},
        {"type": "REVENUE_INCREASE", "percent": 5},
        {"type": "PRICE_CHANGE", "percent": 3, "churnPercent": 1},
        {"type": "CUSTOM", "revenuePercent": 1, "costPercent": 2, "oneOffCash": "1000"},
    )
]

SAVE_AGGREGATES = 100  # aggregates per save() when writing the log in bulk


def scenario_history(actor: Actor, index: int) -> tuple[list[Scenario | Forecast], int]:
    """One scenario's worth of a bulk log, as commands would write it: created, renamed,
    two forecasts requested, every tenth archived. The aggregates and their event count."""
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
            actor, forecast_id=uuid.uuid4(), scenario=scenario, horizon_months=12, paths=100, at=now
        )
        for _ in range(2)
    ]
    if index % 10 == 0:
        scenario.archive(actor, at=now)
    return [scenario, *requested], scenario.version + len(requested)


FORECAST_MONTHS = 24
FORECAST_PATHS = 1000
FAILED_EVERY = 25  # every 25th seeded forecast failed, the rest completed (one queued per tenant)
ARCHIVED_EVERY = 10  # every 10th scenario archived (after its forecasts)
CATCH_UP_POLL_S = 0.2
STALL_S = 30.0  # a projection that does not move for this long has failed


class SaveBatch:
    """Aggregates saved through the log together, one save() (one transaction) per
    ``size`` or more, in the order they were added; flush() saves the rest."""

    def __init__(self, log: EventLog, size: int = SAVE_AGGREGATES) -> None:
        self._log = log
        self._size = size
        self._pending: list[Scenario | Forecast] = []

    def add(self, *aggregates: Scenario | Forecast) -> None:
        self._pending.extend(aggregates)
        if len(self._pending) >= self._size:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._log.save(*self._pending)
            self._pending.clear()


@dataclass
class TenantReads:
    """What a read mix may ask about one tenant: its reader key and its ids."""

    key: str
    scenario_ids: list[str] = field(default_factory=list)
    forecast_ids: list[str] = field(default_factory=list)
    tenant_id: str = ""


@dataclass
class SeedCounts:
    scenarios: int = 0
    archived: int = 0
    completed: int = 0
    failed: int = 0
    queued: int = 0


def seed_tenants(
    log: EventLog,
    *,
    tenants: int,
    scenarios: int,
    forecasts: int,
    deadline: Deadline,
    tenant_name: str = "Read bench",
    distinct_results: int = 0,
) -> tuple[SeedCounts, list[TenantReads]]:
    """Tenants and reader keys through the tenant commands; per tenant ``scenarios``
    scenarios with ``forecasts`` forecasts each, saved through the log in the order the
    commands and the job worker would save them: a scenario, then its forecasts (requested,
    started, completed with the real model's result; a few failed, one queued per tenant),
    and after everything every tenth scenario archived.

    ``distinct_results`` > 0 runs the model that many times per assumption type and gives
    each completed forecast one of those results (same shape and size as its own would
    be): the read path serves stored results, and a large seed would otherwise spend most
    of its time in the model (about 12 ms per forecast here)."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    counts = SeedCounts()
    results: dict[tuple[int, int], Any] | None = {} if distinct_results > 0 else None
    reads: list[TenantReads] = []
    batch = SaveBatch(log)
    to_archive: list[tuple[Scenario, Actor]] = []
    for t in range(tenants):
        tenant = _new_tenant(deps, f"{tenant_name} {t}")
        tenant_id = uuid.UUID(tenant.tenant_id)
        reads.append(tenant)
        user = Actor(tenant_id=tenant_id, actor_id="bench", request_id=f"seed-{t}")
        worker = Actor(tenant_id=tenant_id, actor_id="worker", request_id=f"seed-{t}")
        for s in range(scenarios):
            if deadline.expired():
                raise SystemExit("the budget ran out while seeding")
            scenario = _scenario(user, s)
            tenant.scenario_ids.append(str(scenario.id))
            counts.scenarios += 1
            made = [
                _forecast(
                    scenario,
                    user,
                    worker,
                    index=s * forecasts + f,
                    counts=counts,
                    memo=None if results is None else (results, s, distinct_results),
                )
                for f in range(forecasts)
            ]
            tenant.forecast_ids.extend(str(forecast.id) for forecast in made)
            batch.add(scenario, *made)
            if s % ARCHIVED_EVERY == ARCHIVED_EVERY - 1:
                to_archive.append((scenario, user))
    for scenario, user in to_archive:
        scenario.archive(user, at=utc_now())
        counts.archived += 1
        batch.add(scenario)
    batch.flush()
    return counts, reads


def _new_tenant(deps: Collaborators, name: str) -> TenantReads:
    """A tenant and its reader key, through the tenant commands."""
    tenant_id = tenant_commands.create_tenant(deps, name).tenant_id
    key = tenant_commands.issue_key(deps, tenant_id, "reader").key
    return TenantReads(key=key, tenant_id=str(tenant_id))


def _scenario(user: Actor, index: int) -> Scenario:
    """The ``index``-th scenario of a seeded tenant (assumption types in turn)."""
    return Scenario.create(
        user,
        scenario_id=uuid.uuid4(),
        name=f"Scenario {index}",
        baseline=BASELINE,
        assumptions=ASSUMPTIONS[index % len(ASSUMPTIONS)],
        at=utc_now(),
    )


def seed_large_tenant(
    log: EventLog, *, scenarios: int, deadline: Deadline, name: str = "Large tenant"
) -> TenantReads:
    """One tenant with ``scenarios`` scenarios (created, nothing else), saved through the
    log in batches as SaveBatch does; its reader key and scenario ids."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    tenant = _new_tenant(deps, name)
    user = Actor(tenant_id=uuid.UUID(tenant.tenant_id), actor_id="bench", request_id="seed-large")
    batch = SaveBatch(log, size=1000)
    for s in range(scenarios):
        if s % 1000 == 0 and deadline.expired():
            raise SystemExit("the budget ran out while seeding the large tenant")
        scenario = _scenario(user, s)
        tenant.scenario_ids.append(str(scenario.id))
        batch.add(scenario)
    batch.flush()
    return tenant


def writer_keys(log: EventLog, tenants: list[TenantReads]) -> list[str]:
    """A writer key per tenant (same order), issued through the tenant commands."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    return [
        tenant_commands.issue_key(deps, uuid.UUID(tenant.tenant_id), "writer").key
        for tenant in tenants
    ]


def _forecast(
    scenario: Scenario,
    user: Actor,
    worker: Actor,
    *,
    index: int,
    counts: SeedCounts,
    memo: tuple[dict[tuple[int, int], Any], int, int] | None = None,
) -> Forecast:
    """A forecast of ``scenario``: the tenant's first stays queued, every FAILED_EVERY-th
    failed, the others completed with the model's result for their own seed (or, with
    ``memo`` = (results, scenario index, distinct), one of ``distinct`` results computed
    once per assumption type)."""
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
    slot = None if memo is None else (memo[1] % len(ASSUMPTIONS), index % memo[2])
    result = None if memo is None or slot is None else memo[0].get(slot)
    if result is None:
        result = msgspec.to_builtins(
            forecast_model.run_forecast(
                scenario.baseline,
                scenario.assumptions,
                horizon_months=FORECAST_MONTHS,
                paths=FORECAST_PATHS,
                seed=forecast.id,
            )
        )
        if memo is not None and slot is not None:
            memo[0][slot] = result
    forecast.complete(
        worker,
        result=result,
        compute_seconds=round(time.perf_counter() - started, 6),
        at=utc_now(),
    )
    counts.completed += 1
    return forecast


def projected_positions(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, int]:
    """The log position each named projection has applied (0 before its tables exist)."""
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
    with accubooks(["project"], database_url, {"REDIS_URL": redis_url}) as project:
        project.first_line(deadline)
        return wait_caught_up(database_url, end, project, deadline)


def wait_caught_up(database_url: str, end: int, project: Process, deadline: Deadline) -> float:
    """Seconds until every read model has applied the log up to ``end``; a worker that
    exits or stops moving for STALL_S fails the run."""
    names = [projector.name for projector in wiring.projectors()]
    started = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        last, moved = projected_positions(conn, names), time.monotonic()
        while min(last.values()) < end:
            time.sleep(CATCH_UP_POLL_S)
            now = projected_positions(conn, names)
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
