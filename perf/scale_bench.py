"""Reads against tenant size on PostgreSQL: one tenant with 100,000 scenarios and one with
10, seeded through the log and projected by `accubooks project`, read through one
`accubooks api` process with the cache off (every read reaches the database, which is what
grows with a tenant). Each route is read for both tenants in turn, the order swapped every
round, so the machine's noise falls on both alike; the report gives p50/p95 per route and
tenant, their ratio, and the EXPLAIN (ANALYZE, BUFFERS) of each route's one statement for
the large tenant, as the API issues it (custom plan) and as a prepared statement may come
to run it (generic plan).

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth, user postgres;
the Debian package redis-server for the projection worker's cache invalidation):

    .venv/bin/python -m perf.scale_bench

Options: --large 100000 --small 10 --rounds 500 --warmup-rounds 30 --budget-s 1500. It
creates and drops its own database, talks only to 127.0.0.1, writes
perf/reports/scale.md and perf/reports/scale.json, and exits 1 when a read fails, a route
misses the target (large/small p50 <= 1.2) or a plan reads more of the tenant's rows than
its page needs. Page-number pages (`page=N`) skip N-1 pages of rows in the index, so
their cost grows with N by nature: they are measured and reported, not held to the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx
import psycopg

from commands import tenants as tenant_commands
from commands.context import Collaborators
from domain.events import Actor
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.readstore import ReadStore
from infra.settings import Settings
from perf.harness import ADMIN_URL, REQUEST_TIMEOUT_S, Deadline, git_head, postgres_database
from perf.harness import write_report as write_files
from perf.machine import cpu_model, postgres_version
from perf.processes import api_process, private_redis, stop_on_signals
from perf.scale_plans import explain, plan_problems
from perf.scale_report import (
    TARGET_RATIO,
    Report,
    RouteResult,
    Seeding,
    latency,
    render_markdown,
)
from perf.seeding import SaveBatch, project_until_caught_up, scenario_history
from readapi import dashboard, forecasts, paging, scenarios, usage

# Rows per page of the routes compared: the small tenant has 10 scenarios and 20
# forecasts, so both tenants' pages hold the same rows (the same bytes to encode).
FIRST_LIMIT = 10
DEEP_LIMIT = 5
# Where the deep pages start: this share of the tenant's list lies before them.
DEEP_SHARE = 0.9


# --- seeding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    name: str
    tenant_id: uuid.UUID
    key: str
    scenarios: int
    # A scenario from the middle of its list, and one of its forecasts.
    scenario_id: str
    forecast_id: str


def seed_tenant(
    log: EventLog, batch: SaveBatch, name: str, scenarios: int, deadline: Deadline
) -> Tenant:
    """A tenant and its reader key through the tenant commands, then ``scenarios``
    scenario histories (perf.seeding.scenario_history) through the log."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    tenant_id = tenant_commands.create_tenant(deps, name).tenant_id
    key = tenant_commands.issue_key(deps, tenant_id, "reader").key
    middle = ("", "")
    for index in range(scenarios):
        if index % 1000 == 0 and deadline.expired():
            raise SystemExit("the budget ran out while seeding")
        actor = Actor(tenant_id=tenant_id, actor_id="bench", request_id=f"scale-{index}")
        aggregates, _ = scenario_history(actor, index)
        if index == scenarios // 2:
            middle = (str(aggregates[0].id), str(aggregates[1].id))
        batch.add(*aggregates)
    batch.flush()
    return Tenant(name, tenant_id, key, scenarios, *middle)


# --- the routes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    # The route's statement, issued in-process through the same readapi function.
    load: Callable[[ReadStore], object]
    rows_needed: int
    target: bool = True


def _get(client: httpx.Client, tenant: Tenant, path: str) -> dict[str, Any]:
    response = client.get(path, headers={"Authorization": f"Bearer {tenant.key}"})
    if response.status_code != 200:
        raise SystemExit(f"GET {path} answered {response.status_code}: {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body


def _deep(
    client: httpx.Client, tenant: Tenant, path: str, rows: int, limit: int
) -> tuple[int, str, tuple[str, str]]:
    """The page number before the deep page (DEEP_SHARE of ``rows`` lie before it), the
    cursor that page hands out and the keyset position that cursor holds."""
    page = max(1, int(rows * DEEP_SHARE) // limit)
    body = _get(client, tenant, f"{path}?limit={limit}&page={page}")
    last = body["data"][-1]
    created_at = last["createdAt"] if "createdAt" in last else last["requestedAt"]
    return page, str(body["nextCursor"]), (created_at, last["id"])


def routes_of(client: httpx.Client, tenant: Tenant, month: str) -> list[Route]:
    """The routes compared, for one tenant; the deep pages start DEEP_SHARE into its
    lists, found by asking the API for the page before them."""
    t = tenant.tenant_id
    s_page, s_cursor, s_after = _deep(
        client, tenant, "/api/scenarios", tenant.scenarios, DEEP_LIMIT
    )
    f_page, f_cursor, f_after = _deep(
        client, tenant, "/api/forecasts", 2 * tenant.scenarios, FIRST_LIMIT
    )

    def page(
        limit: int, number: int = 1, after: tuple[str, str] | None = None, **filters: str
    ) -> paging.PageRequest:
        return paging.PageRequest(limit, number, after, dict(filters))

    first, deep = FIRST_LIMIT + 1, DEEP_LIMIT + 1
    return [
        Route(
            "scenarios: first page",
            f"/api/scenarios?limit={FIRST_LIMIT}",
            lambda s: scenarios.list_scenarios(s, t, page(FIRST_LIMIT)),
            first,
        ),
        Route(
            "scenarios: keyset page 90% deep",
            f"/api/scenarios?limit={DEEP_LIMIT}&cursor={s_cursor}",
            lambda s: scenarios.list_scenarios(s, t, page(DEEP_LIMIT, s_page + 1, s_after)),
            deep,
        ),
        Route(
            "scenario detail",
            f"/api/scenarios/{tenant.scenario_id}",
            lambda s: scenarios.load_scenario(s, t, tenant.scenario_id),
            1,
        ),
        Route(
            "forecasts: first page",
            f"/api/forecasts?limit={FIRST_LIMIT}",
            lambda s: forecasts.list_forecasts(s, t, page(FIRST_LIMIT)),
            first,
        ),
        Route(
            "forecasts: keyset page 90% deep",
            f"/api/forecasts?limit={FIRST_LIMIT}&cursor={f_cursor}",
            lambda s: forecasts.list_forecasts(s, t, page(FIRST_LIMIT, f_page + 1, f_after)),
            first,
        ),
        Route(
            "forecasts: one scenario's",
            f"/api/forecasts?scenarioId={tenant.scenario_id}",
            lambda s: forecasts.list_forecasts(
                s, t, page(paging.DEFAULT_LIMIT, scenarioId=tenant.scenario_id)
            ),
            # The scenario has two forecasts: both, and nothing more.
            2,
        ),
        Route(
            "forecasts: status filter",
            f"/api/forecasts?status=queued&limit={FIRST_LIMIT}",
            lambda s: forecasts.list_forecasts(s, t, page(FIRST_LIMIT, status="queued")),
            first,
        ),
        Route(
            "forecast detail",
            f"/api/forecasts/{tenant.forecast_id}",
            lambda s: forecasts.load_forecast(s, t, tenant.forecast_id),
            1,
        ),
        Route("dashboard", "/api/dashboard", lambda s: dashboard.load_dashboard(s, t), 1),
        Route("usage", f"/api/usage?month={month}", lambda s: usage.load_usage(s, t, month), 1),
        Route(
            "scenarios: page-number page 90% deep",
            f"/api/scenarios?limit={DEEP_LIMIT}&page={s_page + 1}",
            lambda s: scenarios.list_scenarios(s, t, page(DEEP_LIMIT, s_page + 1)),
            deep + s_page * DEEP_LIMIT,
            target=False,
        ),
    ]


# --- latency ------------------------------------------------------------------------------


def measure(
    client: httpx.Client,
    tenants: Sequence[Tenant],
    routes: Sequence[Sequence[Route]],
    *,
    rounds: int,
    warmup_rounds: int,
    deadline: Deadline,
) -> list[list[list[float]]]:
    """Seconds per read, [route][tenant][round]: every round reads each route for every
    tenant in turn (the order reversed every other round)."""
    times: list[list[list[float]]] = [[[] for _ in tenants] for _ in routes[0]]
    for r in range(warmup_rounds + rounds):
        if deadline.expired():
            raise SystemExit("the budget ran out while measuring")
        order = list(range(len(tenants)))
        if r % 2:
            order.reverse()
        for i in range(len(routes[0])):
            for t in order:
                headers = {"Authorization": f"Bearer {tenants[t].key}"}
                started = time.perf_counter()
                response = client.get(routes[t][i].path, headers=headers)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise SystemExit(
                        f"GET {routes[t][i].path} answered {response.status_code}:"
                        f" {response.text[:300]}"
                    )
                if r >= warmup_rounds:
                    times[i][t].append(elapsed)
    return times


# --- the run --------------------------------------------------------------------------------


def run(
    *,
    large: int = 100_000,
    small: int = 10,
    rounds: int = 500,
    warmup_rounds: int = 30,
    budget_s: float = 1500.0,
    admin_url: str = ADMIN_URL,
    write_report: bool = True,
    command: str = ".venv/bin/python -m perf.scale_bench",
) -> Report:
    """Seeds, projects, measures and explains; writes perf/reports/scale.md and .json
    (unless ``write_report`` is false) and returns the report."""
    if small < 2 or large < small:
        raise SystemExit("need 2 <= small <= large")
    deadline = Deadline(time.monotonic() + budget_s)
    load_at_start = round(os.getloadavg()[0], 2)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    month = datetime.now(UTC).strftime("%Y-%m")
    api_env = {
        "ACCUBOOKS_CACHE_ENABLED": "false",
        "ACCUBOOKS_LOG_LEVEL": "WARNING",
        "ACCUBOOKS_DB_POOL_SIZE": "2",
        "ACCUBOOKS_DB_POOL_MAX_OVERFLOW": "0",
    }
    problems: list[str] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="scale_bench_"))
        database_url = stack.enter_context(postgres_database(admin_url))
        cache = stack.enter_context(private_redis(tmp, deadline))
        log = open_event_log(Settings(database_url=database_url))
        try:
            began = time.perf_counter()
            batch = SaveBatch(log)
            # The small tenant first: its rows are the oldest, as a tenant that stayed small.
            tenants = [
                seed_tenant(log, batch, "Small tenant", small, deadline),
                seed_tenant(log, batch, "Large tenant", large, deadline),
            ]
            write_s = time.perf_counter() - began
            end = log.position() or 0
        finally:
            log.close()
        _say(f"seeded {end:,} events in {write_s:.1f} s")
        catch_up_s = project_until_caught_up(database_url, cache.url, end, deadline)
        _say(f"read models caught up in {catch_up_s:.1f} s")
        # What autovacuum does on its own a minute after a bulk load: planner statistics.
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("VACUUM ANALYZE")
        seeding = Seeding(
            large_scenarios=large,
            small_scenarios=small,
            events=end,
            write_s=round(write_s, 2),
            catch_up_s=round(catch_up_s, 2),
        )
        env = {**api_env, "REDIS_URL": cache.url}
        with (
            api_process(database_url, env, deadline) as (url, _),
            httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client,
        ):
            routes = [routes_of(client, tenant, month) for tenant in tenants]
            _say(f"measuring {len(routes[0])} routes, {rounds} rounds")
            # Page-number pages apart, after the rest: their heavy reads (O(offset)) would
            # otherwise sit next to the reads of the routes held to the target.
            held = [[r for r in rs if r.target] for rs in routes]
            apart = [[r for r in rs if not r.target] for rs in routes]
            times = measure(
                client, tenants, held, rounds=rounds, warmup_rounds=warmup_rounds, deadline=deadline
            )
            times += measure(
                client,
                tenants,
                apart,
                rounds=max(1, rounds // 5),
                warmup_rounds=3,
                deadline=deadline,
            )
            routes = [h + a for h, a in zip(held, apart, strict=True)]
        plans = explain(database_url, [(r.name, r.load, r.rows_needed) for r in routes[1]])
    results: list[RouteResult] = []
    for i, route in enumerate(routes[1]):
        small_latency, large_latency = latency(times[i][0]), latency(times[i][1])
        ratio = round(large_latency.p50_ms / small_latency.p50_ms, 3)
        paired = statistics.median(b / s for b, s in zip(times[i][1], times[i][0], strict=True))
        ok = ratio <= TARGET_RATIO or not route.target
        results.append(
            RouteResult(
                route=route.name,
                path_large=_short(route.path),
                path_small=_short(routes[0][i].path),
                large=large_latency,
                small=small_latency,
                p50_ratio=ratio,
                paired_ratio=round(paired, 3),
                target=route.target,
                ok=ok,
            )
        )
        if not ok:
            problems.append(f"{route.name}: p50 ratio {ratio} over {TARGET_RATIO}")
    held_names = {route.name for route in routes[1] if route.target}
    for plan in plans:
        if plan.route in held_names:
            problems += plan_problems(plan)
    report = Report(
        ok=not problems,
        command=command,
        machine={
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "load_average_start": load_at_start,
            "load_average_end": round(os.getloadavg()[0], 2),
            "started_at": started_at,
            "git_head": git_head(),
            "postgres": postgres_version(admin_url),
        },
        seeding=seeding,
        rounds=rounds,
        warmup_rounds=warmup_rounds,
        api_env=api_env,
        routes=results,
        plans=plans,
        problems=problems,
    )
    if write_report:
        write_files("scale", render_markdown(report), report)
    return report


def _short(path: str) -> str:
    # Cursors are long and opaque: the report shows where one goes, not its bytes.
    if "cursor=" in path:
        head, _, _ = path.partition("cursor=")
        return head + "cursor=<deep>"
    return path


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.scale_bench", description=__doc__)
    parser.add_argument("--large", type=int, default=100_000, help="scenarios of the large tenant")
    parser.add_argument("--small", type=int, default=10, help="scenarios of the small tenant")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--warmup-rounds", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=1500.0)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop_on_signals()
    command = " ".join([".venv/bin/python -m perf.scale_bench", *(argv or sys.argv[1:])])
    report = run(
        large=args.large,
        small=args.small,
        rounds=args.rounds,
        warmup_rounds=args.warmup_rounds,
        budget_s=args.budget_s,
        admin_url=args.admin_url,
        command=command,
    )
    print(render_markdown(report).split("\n## ", 1)[0])
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
