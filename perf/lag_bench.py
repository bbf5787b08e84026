"""Projection lag under the read mix, on PostgreSQL: `accubooks project` and `accubooks api`
run as separate processes (the production topology, with a private Redis cache); wrk
replays the seed's read mix (perf/read_mix.lua) against the API while create-scenario
commands are sent one at a time. For each command: the time from its 201 (the command
acknowledged) until the read models have applied its position (the
``X-Consistency-Token``), seen by polling their tracking rows in PostgreSQL, and until
``GET /api/scenarios/{id}`` answers 200. The same commands are first measured with no
read load, as the baseline of the same run.

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user
postgres, and wrk):

    .venv/bin/python -m perf.lag_bench

Options: --commands 300 --connections 32 --threads 2 --budget-s 600. It creates and drops
its own database, talks only to 127.0.0.1, prints the report and, with --write, puts it
into perf/reports/projections.md and .json (a section of its own). Exits 1 when the p99
under load is over the target or a command is not seen.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx2 as httpx
import msgspec
import psycopg

from commands import tenants as tenant_commands
from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import open_event_log
from infra.settings import Settings
from perf import read_mix
from perf.harness import (
    REPORTS,
    REQUEST_TIMEOUT_S,
    Deadline,
    git_head,
    postgres_database,
    write_report,
)
from perf.processes import accubooks, private_redis
from perf.seeding import SCENARIO_BODY, project_until_caught_up, seed_tenants
from perf.wrk import LoadShape, Wrk, run_wrk, write_plan, wrk_command
from service import wiring

TARGET_P99_MS = 50.0
# The longest one command may take to become visible before it counts as not seen.
VISIBILITY_TIMEOUT_S = 10.0
POLL_S = 0.0005  # between two reads of the tracking positions
PLAN_SIZE = 20_000
WRK_TIMEOUT_S = 5.0


class Lag(msgspec.Struct, frozen=True, kw_only=True):
    """Command acknowledged -> applied, in milliseconds (nearest-rank percentiles)."""

    commands: int
    seen: int
    not_seen: int
    failed: int
    # Until the scenarios read model (the one its read uses) has applied the position.
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # Until every read model has applied it.
    all_models_p50_ms: float
    all_models_p99_ms: float
    # Until GET /api/scenarios/{id} answers 200 (polled back to back through the API).
    read_visible_p50_ms: float
    read_visible_p99_ms: float
    ack_p50_ms: float


class LagReport(msgspec.Struct, frozen=True, kw_only=True):
    idle: Lag
    loaded: Lag
    read_load: Wrk | None
    wrk_command: str
    connections: int
    target_p99_ms: float
    ok: bool
    machine: dict[str, object]


def _percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return round(ordered[min(rank, len(ordered)) - 1] * 1000, 2)


class _Positions:
    """Reads every read model's tracking position in one statement."""

    def __init__(self, conn: psycopg.Connection[tuple[int, ...]]) -> None:
        self._conn = conn
        names = [p.name for p in wiring.projectors()]
        self._index = names.index("scenarios")
        self._sql = "SELECT " + ", ".join(
            f"(SELECT COALESCE(MAX(notification_id), 0) FROM {n}_tracking)" for n in names
        )

    def read(self) -> tuple[int, int]:
        """(the scenarios model's position, the lowest of all models')."""
        row = self._conn.execute(self._sql, prepare=True).fetchone()
        assert row is not None
        return int(row[self._index]), min(int(p) for p in row)


def measure(
    api_url: str, key: str, positions: _Positions, commands: int, deadline: Deadline
) -> Lag:
    """``commands`` create-scenario commands, one after the other, each followed until its
    position is applied and its scenario readable."""
    acks: list[float] = []
    scenarios_lag: list[float] = []
    all_lag: list[float] = []
    read_lag: list[float] = []
    failed = not_seen = 0
    with httpx.Client(
        base_url=api_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=REQUEST_TIMEOUT_S,
        trust_env=False,
    ) as client:
        for _ in range(commands):
            if deadline.expired():
                break
            sent = time.perf_counter()
            created = client.post(
                "/api/scenarios",
                content=SCENARIO_BODY,
                headers={"Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"},
            )
            acked = time.perf_counter()
            token = created.headers.get("x-consistency-token")
            if created.status_code != 201 or token is None:
                failed += 1
                continue
            acks.append(acked - sent)
            position = int(token)
            seen_scenarios: float | None = None
            while True:
                mine, lowest = positions.read()
                now = time.perf_counter()
                if seen_scenarios is None and mine >= position:
                    seen_scenarios = now - acked
                if lowest >= position:
                    break
                if now - acked > VISIBILITY_TIMEOUT_S:
                    break
                time.sleep(POLL_S)
            if seen_scenarios is None or lowest < position:
                not_seen += 1
                continue
            scenarios_lag.append(seen_scenarios)
            all_lag.append(now - acked)
            path = f"/api/scenarios/{created.json()['id']}"
            while client.get(path).status_code == 404:
                if time.perf_counter() - acked > VISIBILITY_TIMEOUT_S:
                    break
            read_lag.append(time.perf_counter() - acked)
    return Lag(
        commands=commands,
        seen=len(scenarios_lag),
        not_seen=not_seen,
        failed=failed,
        p50_ms=_percentile_ms(scenarios_lag, 50),
        p95_ms=_percentile_ms(scenarios_lag, 95),
        p99_ms=_percentile_ms(scenarios_lag, 99),
        max_ms=round(max(scenarios_lag, default=float("nan")) * 1000, 2),
        all_models_p50_ms=_percentile_ms(all_lag, 50),
        all_models_p99_ms=_percentile_ms(all_lag, 99),
        read_visible_p50_ms=_percentile_ms(read_lag, 50),
        read_visible_p99_ms=_percentile_ms(read_lag, 99),
        ack_p50_ms=_percentile_ms(acks, 50),
    )


def run(
    *,
    commands: int = 300,
    connections: int = 32,
    threads: int = 2,
    tenants: int = 4,
    scenarios: int = 50,
    budget_s: float = 600.0,
    seed: int = 1,
) -> LagReport:
    """The benchmark; its report (not written)."""
    deadline = Deadline(time.monotonic() + budget_s)
    rng = random.Random(seed)
    machine: dict[str, object] = {
        "nproc": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_head": git_head(),
    }
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        cache = stack.enter_context(private_redis(tmp, deadline))
        log = open_event_log(Settings(database_url=url))
        try:
            _, reads = seed_tenants(
                log, tenants=tenants, scenarios=scenarios, forecasts=2, deadline=deadline
            )
            deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
            writer = tenant_commands.issue_key(deps, UUID(reads[0].tenant_id), "writer").key
            end = log.position()
        finally:
            log.close()
        project_until_caught_up(url, cache.url, end, deadline)
        env = {"REDIS_URL": cache.url}
        stack.enter_context(accubooks(["project"], url, env)).first_line(deadline)
        api = stack.enter_context(
            accubooks(["api", "--host", "127.0.0.1", "--port", "0"], url, env)
        )
        api_url = str(api.first_line(deadline)["url"])
        conn = stack.enter_context(psycopg.connect(url, autocommit=True, connect_timeout=5))
        positions = _Positions(conn)
        idle = measure(api_url, writer, positions, commands, deadline)
        plan = Path(tmp) / "mix.tsv"
        write_plan(plan, read_mix.draw_plan(reads, PLAN_SIZE, rng))
        # wrk runs for longer than the commands may take; they are measured while it runs.
        seconds = max(10.0, min(deadline.remaining() - 30, 120.0))
        shape = LoadShape(
            connections=connections,
            threads=threads,
            duration_s=seconds,
            warmup_s=0,
            timeout_s=WRK_TIMEOUT_S,
        )
        command = wrk_command(api_url, plan, shape, seconds)
        result: list[Wrk] = []
        load = threading.Thread(
            target=lambda: result.append(run_wrk(command, seconds, deadline)), daemon=True
        )
        load.start()
        time.sleep(2.0)  # the load at its full rate before the first command
        loaded = measure(api_url, writer, positions, commands, deadline)
        load.join(seconds + 90)
    machine["load_average_end"] = os.getloadavg()[0]
    ok = loaded.not_seen == 0 and loaded.failed == 0 and loaded.p99_ms <= TARGET_P99_MS
    return LagReport(
        idle=idle,
        loaded=loaded,
        read_load=result[0] if result else None,
        wrk_command=" ".join([Path(command[0]).name, *command[1:]]),
        connections=connections,
        target_p99_ms=TARGET_P99_MS,
        ok=ok,
        machine=machine,
    )


def markdown(report: LagReport) -> str:
    rows = [
        "| read load | commands | seen | p50 ms | p95 ms | p99 ms | max ms |"
        " all models p50 / p99 ms | GET 200 p50 / p99 ms | ack p50 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, lag in (("none", report.idle), ("read mix", report.loaded)):
        rows.append(
            f"| {name} | {lag.commands} | {lag.seen} | {lag.p50_ms} | {lag.p95_ms} |"
            f" {lag.p99_ms} | {lag.max_ms} | {lag.all_models_p50_ms} /"
            f" {lag.all_models_p99_ms} | {lag.read_visible_p50_ms} /"
            f" {lag.read_visible_p99_ms} | {lag.ack_p50_ms} |"
        )
    load = report.read_load
    served = (
        f"wrk served {load.requests:,} reads ({load.requests / (load.duration_us / 1e6):,.0f}"
        f" req/s, p99 {load.p99_us / 1000:.1f} ms, {load.status_errors} status errors,"
        f" {load.socket_errors} socket errors)"
        if load is not None
        else "wrk gave no result"
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"Target: p99 <= {report.target_p99_ms:g} ms under the read mix:"
            f" {'met' if report.ok else 'NOT met'}.",
            "",
            *rows,
            "",
            f"Read load: `{report.wrk_command}`; {served}.",
            "",
            "Lag = from a create-scenario command's 201 to the scenarios read model's"
            " tracking position reaching the command's `X-Consistency-Token` (polled in"
            " PostgreSQL every 0.5 ms); `accubooks project` and `accubooks api` are separate"
            " processes, woken by LISTEN/NOTIFY. Commands are sent one after the other.",
            "",
            f"Machine: {msgspec.json.encode(report.machine).decode()}.",
            "",
        ]
    )


SECTION = "## Projection lag under the read mix"


def merge_into_projections_report(text: str, report: LagReport) -> None:
    """Puts this section into perf/reports/projections.md (replacing an older one) and
    the report into projections.json under ``lagUnderReadMix``."""
    md, js = REPORTS / "projections.md", REPORTS / "projections.json"
    old = md.read_text() if md.exists() else ""
    kept = old.split(SECTION)[0].rstrip("\n")
    md.write_text(f"{kept}\n\n{text}" if kept else text)
    data = msgspec.json.decode(js.read_bytes()) if js.exists() else {}
    data["lagUnderReadMix"] = msgspec.to_builtins(report)
    js.write_bytes(msgspec.json.format(msgspec.json.encode(data)) + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=300)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--write", action="store_true", help="write perf/reports/lag.*")
    args = parser.parse_args(argv)
    report = run(
        commands=args.commands,
        connections=args.connections,
        threads=args.threads,
        budget_s=args.budget_s,
    )
    text = markdown(report)
    print(text)
    if args.write:
        write_report("lag", text, report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
