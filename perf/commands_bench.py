"""Commands/s for POST /api/scenarios on PostgreSQL with 8 concurrent clients, quoted as
ratios to baselines measured in the same run against the same API process: GET /health/live
with 8 clients (the HTTP and client ceiling) and the same POST with 1 client.

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user postgres):

    .venv/bin/python -m perf.commands_bench --requests 2000

It creates and drops its own database, starts the API with the real CLI, prints the table
and writes perf/reports/commands.md and perf/reports/commands.json. Exits 1 on any non-2xx
answer, transport error or unfinished phase.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx2 as httpx
import msgspec

from perf.cpu import CpuMeter
from perf.harness import (
    ADMIN_URL,
    REQUEST_TIMEOUT_S,
    Deadline,
    git_head,
    postgres_database,
    write_report,
)
from perf.machine import postgres_version
from perf.processes import accubooks_json, api_process

SCENARIO_BODY = msgspec.json.encode(
    {
        "name": "Hire two engineers",
        "type": "HIRING",
        "baseline": {
            "startMonth": "2026-01",
            "openingCash": "250000.00",
            "monthlyRevenue": "40000",
            "monthlyCosts": 35000.5,
            "revenueGrowthRate": 0.02,
            "costGrowthRate": 0.01,
        },
        "assumptions": {"headcount": 2, "monthlyCostPerHead": "6500", "startOffsetMonths": 1},
    }
)

# One request on a client; answers the status code.
Send = Callable[[httpx.Client], int]


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    clients: int
    requests: int
    completed: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    # CPU per completed request, by process: where the time goes (None off Linux).
    api_cpu_us_per_req: float | None
    postgres_cpu_us_per_req: float | None
    loadgen_cpu_us_per_req: float


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    loadavg_1m_at_start: float
    python: str
    postgres: str
    httpx2: str
    date: str
    git_head: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: Machine
    phases: list[Phase]
    post8_over_health8: float
    post8_over_post1: float


# --- the load generator -------------------------------------------------------------------


@dataclass
class _Worker:
    count: int
    latencies_s: list[float] = field(default_factory=list)
    non_2xx: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    finished_at: float = 0.0


def _percentile_ms(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted seconds, in milliseconds."""
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1] * 1000


def run_phase(
    name: str,
    *,
    url: str,
    headers: dict[str, str],
    send: Send,
    clients: int,
    requests: int,
    deadline: Deadline,
    cpu: CpuMeter | None,
) -> Phase:
    """``requests`` requests spread over ``clients`` threads, each with its own persistent
    connection (opened before the clock starts); timed from a common start line."""
    workers = [
        _Worker(count=requests // clients + (i < requests % clients)) for i in range(clients)
    ]
    started: list[float] = []

    def start_line() -> None:
        if cpu is not None:
            cpu.start()
        started.append(time.perf_counter())

    barrier = threading.Barrier(clients, action=start_line)

    def work(w: _Worker) -> None:
        with httpx.Client(
            base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, trust_env=False
        ) as client:
            client.get("/health/live").raise_for_status()
            barrier.wait(timeout=deadline.remaining())
            for _ in range(w.count):
                if deadline.expired():
                    break
                t0 = time.perf_counter()
                try:
                    status = send(client)
                except httpx.HTTPError as e:
                    w.errors.append(repr(e))
                    continue
                w.latencies_s.append(time.perf_counter() - t0)
                if not 200 <= status < 300:
                    w.non_2xx += 1
                    w.statuses[status] = w.statuses.get(status, 0) + 1
            w.finished_at = time.perf_counter()

    def guarded(w: _Worker) -> None:
        try:
            work(w)
        except (httpx.HTTPError, threading.BrokenBarrierError) as e:
            w.errors.append(repr(e))
            # The others stop waiting at the start line instead of for the whole budget.
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=deadline.remaining() + REQUEST_TIMEOUT_S)
    used = cpu.stop() if cpu is not None else None

    finished = [w.finished_at for w in workers if w.finished_at]
    seconds = max(finished) - started[0] if started and finished else float("nan")
    ordered = sorted(s for w in workers for s in w.latencies_s)
    completed = len(ordered)
    for w in workers:
        for status, n in w.statuses.items():
            print(f"{name}: {n} answers with status {status}", file=sys.stderr)
        for error in w.errors[:3]:
            print(f"{name}: {error}", file=sys.stderr)

    def per_req(cpu_s: float | None) -> float | None:
        return None if cpu_s is None or not completed else cpu_s / completed * 1e6

    # CPU seconds: the API process's (None when it was gone at either end), the
    # PostgreSQL backends' (None when none could be read) and this load generator's.
    api_cpu = None if used is None else used.processes["api"]
    pg_cpu = None if used is None or not used.postgres_backends else used.postgres_s
    loadgen_cpu = 0.0 if used is None else used.this_process_s
    return Phase(
        name=name,
        clients=clients,
        requests=requests,
        completed=completed,
        seconds=seconds,
        req_per_s=completed / seconds if seconds > 0 else 0.0,
        p50_ms=_percentile_ms(ordered, 50),
        p95_ms=_percentile_ms(ordered, 95),
        p99_ms=_percentile_ms(ordered, 99),
        non_2xx=sum(w.non_2xx for w in workers),
        errors=sum(len(w.errors) for w in workers),
        api_cpu_us_per_req=per_req(api_cpu),
        postgres_cpu_us_per_req=per_req(pg_cpu),
        loadgen_cpu_us_per_req=per_req(loadgen_cpu) or 0.0,
    )


def post_scenario(client: httpx.Client) -> int:
    # A fresh key per request: every request is a new command, never a replay.
    response = client.post(
        "/api/scenarios", content=SCENARIO_BODY, headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    return response.status_code


def get_live(client: httpx.Client) -> int:
    return client.get("/health/live").status_code


# --- the report ---------------------------------------------------------------------------


def machine_facts(admin_url: str) -> Machine:
    return Machine(
        nproc=len(os.sched_getaffinity(0)),
        loadavg_1m_at_start=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        postgres=postgres_version(admin_url),
        httpx2=httpx.__version__,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        git_head=git_head(),
    )


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(report: Report) -> str:
    m = report.machine
    lines = [
        "# Commands benchmark: POST /api/scenarios on PostgreSQL",
        "",
        f"`{report.command}` — {'ok' if report.ok else '**FAILED** (see non-2xx/errors)'}",
        "",
        "| phase | clients | done | s | req/s | p50 ms | p95 ms | p99 ms | non-2xx | errors "
        "| API CPU µs/req | PG CPU µs/req | loadgen CPU µs/req |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.phases:
        lines.append(
            f"| {p.name} | {p.clients} | {p.completed} | {p.seconds:.2f} | {p.req_per_s:,.0f} "
            f"| {p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} | {p.non_2xx} | {p.errors} "
            f"| {_fmt(p.api_cpu_us_per_req)} | {_fmt(p.postgres_cpu_us_per_req)} "
            f"| {_fmt(p.loadgen_cpu_us_per_req)} |"
        )
    lines += [
        "",
        "| ratio | value |",
        "|---|--:|",
        f"| POST 8 clients / health 8 clients | {report.post8_over_health8:.3f} |",
        f"| POST 8 clients / POST 1 client | {report.post8_over_post1:.2f} |",
        "",
        "POST-8 / health-8 is the share of the bare HTTP + client ceiling (same process, same "
        "Python load generator, itself a cost: see its CPU) that a command keeps: the lower, "
        "the more the command path dominates.",
        "POST-8 / POST-1 is what 8 concurrent clients buy over one: near 1 means commands are "
        f"serialized somewhere; more than nproc ({m.nproc}) would mean I/O waits overlap.",
        "",
        f"Machine: nproc {m.nproc}, load average (1 min) at start {m.loadavg_1m_at_start}, "
        f"Python {m.python}, PostgreSQL {m.postgres}, httpx2 {m.httpx2}; {m.date}; "
        f"git HEAD {m.git_head}. The load generator runs on the same machine and competes "
        "for its cores; CPU per request is per process (PG: backends of the benchmark "
        "database).",
        "",
    ]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# --- the run ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perf.commands_bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="POSTs with 8 clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--health-requests", type=int, default=None, help="default: --requests")
    parser.add_argument("--single-requests", type=int, default=300, help="POSTs with 1 client")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per endpoint")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="global time budget")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.requests < 1 or args.clients < 1 or args.single_requests < 1:
        raise SystemExit("--requests, --clients and --single-requests must be at least 1")
    deadline = Deadline(time.monotonic() + args.timeout_s)
    machine = machine_facts(args.admin_url)
    clients = args.clients

    with postgres_database(args.admin_url) as database_url:
        tenant = accubooks_json(["tenants", "create", "perf"], database_url, deadline)
        key = accubooks_json(
            ["keys", "issue", tenant["tenantId"], "--role", "writer"], database_url, deadline
        )
        headers = {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"}
        with api_process(database_url, {}, deadline) as (url, pid):
            cpu = CpuMeter({"api": pid}, database_url)

            def phase(name: str, send: Send, n_clients: int, n: int, timed: bool) -> Phase:
                result = run_phase(
                    name,
                    url=url,
                    headers=headers,
                    send=send,
                    clients=n_clients,
                    requests=n,
                    deadline=deadline,
                    cpu=cpu if timed else None,
                )
                print(f"{name}: {result.req_per_s:,.0f} req/s", file=sys.stderr, flush=True)
                return result

            warmups = [
                phase("warm-up health", get_live, clients, args.warmup, False),
                phase("warm-up POST", post_scenario, clients, args.warmup, False),
            ]
            health8 = phase(
                f"GET /health/live x{clients}",
                get_live,
                clients,
                args.health_requests or args.requests,
                True,
            )
            post1 = phase("POST /api/scenarios x1", post_scenario, 1, args.single_requests, True)
            post8 = phase(
                f"POST /api/scenarios x{clients}", post_scenario, clients, args.requests, True
            )

    phases = [health8, post1, post8]
    ok = not deadline.expired() and all(
        p.non_2xx == 0 and p.errors == 0 and p.completed == p.requests for p in [*warmups, *phases]
    )
    report = Report(
        ok=ok,
        command=" ".join([".venv/bin/python -m perf.commands_bench", *(argv or sys.argv[1:])]),
        machine=machine,
        phases=phases,
        post8_over_health8=_ratio(post8.req_per_s, health8.req_per_s),
        post8_over_post1=_ratio(post8.req_per_s, post1.req_per_s),
    )
    markdown = render_markdown(report)
    write_report("commands", markdown, report)
    print(markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
