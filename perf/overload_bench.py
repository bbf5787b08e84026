"""Overload (issue 8): one API process is measured for its capacity on the read mix (wrk,
closed loop), then offered 3x that for a bounded time (perf/openloop.py, open loop): the
admitted requests must keep p99 <= 50 ms, goodput >= 90 % of capacity, every other answer
503 OVERLOADED; then offered 0.5x capacity right after, whose first second must already
meet the p99 target (it recovers at once). All against the same server, in one run.

    .venv/bin/python -m perf.overload_bench            # about 1.5 minutes
    .venv/bin/python -m perf.overload_bench --quick    # under a minute
    # the bound that follows latency (its capacity measured with 8 connections: fewer
    # than the bound settles at, so that the closed loop is never shed):
    .venv/bin/python -m perf.overload_bench --latency-target-ms 12 --report overload_target
    # the edge (deploy/haproxy.cfg, apt-get install -y haproxy) in front of the process:
    .venv/bin/python -m perf.overload_bench --edge --report overload_edge

The workload is chosen so that a Python open-loop generator can offer 3x the capacity on
this 2-core machine and stay small against the server: ONE `accubooks api` process with
the read cache off, so every read is a PostgreSQL statement and costs the server (and
PostgreSQL) far more CPU than it costs the generator to send it. With the cache on the
mix runs at ~7,800 req/s on two processes, 3x of which no Python client can offer here.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and wrk. Creates and
drops its own database, seeds it through the tenant commands and the log
(perf/seeding.py), talks only to 127.0.0.1, writes perf/reports/overload.md and .json.
Exits 1 when a target is missed or the budget runs out; every process it started is
stopped.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import httpx2 as httpx

from infra.eventstore import open_event_log
from infra.settings import Settings, from_env
from perf import api_metrics, read_mix
from perf.cpu import CpuMeter, CpuUsed
from perf.harness import ADMIN_URL, REQUEST_TIMEOUT_S, Deadline, postgres_database, write_report
from perf.openloop import OpenLoopResult, RouteLatency, open_loop
from perf.overload_report import (
    SHED_CODE,
    Capacity,
    Overload,
    Recovery,
    Report,
    checks,
    render_markdown,
)
from perf.processes import accubooks, api_process, edge_proxy, family, stop_on_signals
from perf.read_report import Cores, cores_of, machine_facts
from perf.seeding import seed_tenants, wait_caught_up
from perf.topology import DISTINCT_RESULTS
from perf.wrk import LoadShape, read_plan, run_wrk, write_plan, wrk_command

NONE_ADMITTED = RouteLatency(requests=0, errors=0, p50_ms=0, p95_ms=0, p99_ms=0, max_ms=0)


WORKLOAD = (
    "{processes} with the read cache off "
    "(ACCUBOOKS_CACHE_ENABLED=false, no REDIS_URL): every read is a PostgreSQL statement, "
    "so a request costs the server and PostgreSQL far more CPU than the generator, and 3x "
    "the capacity is a rate a Python open-loop client can offer on this 2-core machine (the "
    "cached mix on two processes, ~7,800 req/s, is not)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.overload_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller and shorter: a smoke run")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--scenarios", type=int, default=200, help="per tenant")
    parser.add_argument("--forecasts", type=int, default=2, help="per scenario")
    parser.add_argument("--plan", type=int, default=20_000, help="requests drawn for the mix")
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        help="wrk, capacity phase; default 32, or 8 with --latency-target-ms (a closed loop "
        "over the bound the target settles at would be shed, and measure the shedding)",
    )
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--overload-factor", type=float, default=3.0)
    parser.add_argument(
        "--overload-connections",
        type=int,
        default=256,
        help="opened before the overload (the steady state's need), so it starts at full rate",
    )
    parser.add_argument("--recovery-s", type=float, default=10.0)
    parser.add_argument("--recovery-factor", type=float, default=0.5)
    parser.add_argument(
        "--max-in-flight", type=int, default=0, help="ACCUBOOKS_MAX_IN_FLIGHT; 0: the default"
    )
    parser.add_argument(
        "--latency-target-ms",
        type=float,
        default=None,
        help="ACCUBOOKS_SHED_LATENCY_TARGET_MS; unset: the default",
    )
    parser.add_argument(
        "--edge",
        action="store_true",
        help="serve through deploy/haproxy.cfg, which sheds before the API process; the "
        "capacity is then measured through it too",
    )
    parser.add_argument(
        "--edge-max-in-flight",
        type=int,
        default=None,
        help="ACCUBOOKS_EDGE_MAX_IN_FLIGHT; default 8 per worker process",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="API worker processes (accubooks api --workers)"
    )
    parser.add_argument("--edge-queue", type=int, default=16, help="ACCUBOOKS_EDGE_QUEUE")
    parser.add_argument("--report", default="overload", help="perf/reports/<REPORT>.md and .json")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=170.0)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


QUICK = {"tenants": 5, "scenarios": 100, "warmup_s": 1.0, "capacity_s": 5.0}
QUICK |= {"overload_s": 8.0, "recovery_s": 5.0, "budget_s": 55.0}


def main(argv: list[str] | None = None) -> int:
    report = run(argv)
    markdown = render_markdown(report)
    write_report(_parser().parse_args(argv).report, markdown, report)
    print(markdown)
    return 0 if report.ok else 1


def run(argv: list[str] | None = None) -> Report:
    """The whole benchmark (options as on the command line): its report, not written."""
    args = _parser().parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    stop_on_signals()
    deadline = Deadline(time.monotonic() + args.budget_s)
    load_at_start = round(os.getloadavg()[0], 2)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    rng = random.Random(args.seed)
    api_env = {"ACCUBOOKS_CACHE_ENABLED": "false", "ACCUBOOKS_LOG_LEVEL": args.log_level}
    if args.max_in_flight:
        api_env["ACCUBOOKS_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    if args.latency_target_ms is not None:
        api_env["ACCUBOOKS_SHED_LATENCY_TARGET_MS"] = f"{args.latency_target_ms:g}"
    capacity: Capacity | None = None
    overload: Overload | None = None
    recovery: Recovery | None = None
    problems: list[str] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="overload_bench_"))
        database_url = stack.enter_context(postgres_database(args.admin_url))
        log = open_event_log(Settings(database_url=database_url))
        try:
            _, reads = seed_tenants(
                log,
                tenants=args.tenants,
                scenarios=args.scenarios,
                forecasts=args.forecasts,
                deadline=deadline,
                tenant_name="Overload bench",
                distinct_results=DISTINCT_RESULTS,
            )
            events = log.position()
        finally:
            log.close()
        # No Redis: with the cache off nothing reads the generations the workers bump.
        with accubooks(["project"], database_url) as project:
            project.first_line(deadline)
            catch_up_s = wait_caught_up(database_url, events, project, deadline)
        _say(f"seeded {events:,} events, read models caught up in {catch_up_s:.1f} s")
        plan_file = Path(tmp) / "mix.tsv"
        write_plan(plan_file, read_mix.draw_plan(reads, args.plan, rng))
        plan = read_plan(plan_file)
        try:
            with ExitStack() as served:
                url, pid = served.enter_context(
                    api_process(database_url, api_env, deadline, workers=args.workers)
                )
                # The parent and its worker processes (cores_of adds up "server*").
                processes = {
                    "server" if i == 0 else f"server {i + 1}": p for i, p in enumerate(family(pid))
                }
                # More connections than the process admits would be shed, and the
                # shedding would cost the capacity it measures.
                admits = from_env(api_env).max_in_flight
                connections = args.connections or (8 if args.latency_target_ms else 32)
                edge_admits = args.edge_max_in_flight or 8 * args.workers
                if args.edge:
                    edge = served.enter_context(
                        edge_proxy(
                            url,
                            deadline,
                            max_in_flight=edge_admits,
                            queue=args.edge_queue,
                        )
                    )
                    url, processes["edge"] = edge.url, edge.pid
                    admits = edge_admits
                    connections = args.connections or admits
                meter = CpuMeter(processes, database_url)
                shape = LoadShape(
                    connections=min(connections, admits),
                    threads=1,
                    duration_s=args.capacity_s,
                    warmup_s=args.warmup_s,
                    timeout_s=REQUEST_TIMEOUT_S,
                )
                capacity = _capacity(url, plan_file, shape, meter, deadline)
                _say(f"capacity: {capacity.capacity_per_s:,.0f} req/s (2xx)")
                rate = capacity.capacity_per_s * args.overload_factor
                _budget(deadline, args.overload_s + args.recovery_s + 2 * REQUEST_TIMEOUT_S)
                before = api_metrics.scrape(url)
                meter.start()
                started = time.perf_counter()
                result = open_loop(
                    url,
                    plan,
                    rate,
                    args.overload_s,
                    seed=args.seed,
                    connections=args.overload_connections,
                )
                used = meter.stop()
                shed = api_metrics.delta(
                    before, api_metrics.scrape(url), "accubooks_shed_requests_total"
                )
                overload = _overload(args.overload_factor, capacity, result, used, shed)
                _say(
                    f"overload: offered {rate:,.0f} req/s, goodput "
                    f"{overload.goodput_ratio:.0%} of capacity, admitted p99 "
                    f"{overload.admitted.p99_ms:g} ms, {overload.shed_503:,} shed"
                )
                rate = capacity.capacity_per_s * args.recovery_factor
                after_s = time.perf_counter() - started - args.overload_s
                meter.start()
                result = open_loop(url, plan, rate, args.recovery_s, seed=args.seed + 1)
                recovery = _recovery(args.recovery_factor, result, cores_of(meter.stop()), after_s)
                _say(f"recovery: first second p99 {recovery.first_second_p99_ms} ms")
        except (SystemExit, OSError, httpx.HTTPError) as e:
            # The budget ran out or the server stopped answering: report what was measured.
            problems.append(f"stopped early: {e.code if isinstance(e, SystemExit) else e!r}")
    checked = checks(capacity, overload, recovery)
    problems += [f"missed: {c.name} ({c.measured})" for c in checked if not c.met]
    return Report(
        ok=not problems and len(checked) == 4,
        command=" ".join([".venv/bin/python -m perf.overload_bench", *(argv or sys.argv[1:])]),
        machine=machine_facts(args.admin_url, load_at_start, date),
        workload=WORKLOAD.format(
            processes="one `accubooks api` process (--workers 1)"
            if args.workers == 1
            else f"`accubooks api --workers {args.workers}`"
        )
        + (
            ""
            if not args.edge
            else f"; served through the edge, deploy/haproxy.cfg (ACCUBOOKS_EDGE_MAX_IN_FLIGHT="
            f"{args.edge_max_in_flight or 8 * args.workers}, ACCUBOOKS_EDGE_QUEUE="
            f"{args.edge_queue}), which sheds "
            "before the API process; the capacity is measured through it too"
        ),
        tenants=args.tenants,
        scenarios=args.scenarios,
        events=events,
        api_env=api_env,
        capacity=capacity,
        overload=overload,
        recovery=recovery,
        checks=checked,
        problems=problems,
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _budget(deadline: Deadline, needed_s: float) -> None:
    if deadline.remaining() < needed_s:
        raise SystemExit(f"the budget ran out ({needed_s:g} s needed)")


def _capacity(
    url: str, plan: Path, shape: LoadShape, meter: CpuMeter, deadline: Deadline
) -> Capacity:
    run_wrk(wrk_command(url, plan, shape, shape.warmup_s), shape.warmup_s, deadline)
    command = wrk_command(url, plan, shape, shape.duration_s)
    meter.start()
    result = run_wrk(command, shape.duration_s, deadline)
    cores = cores_of(meter.stop())
    seconds = result.duration_us / 1e6
    return Capacity(
        wrk_command=" ".join([Path(command[0]).name, *command[1:]]),
        seconds=round(seconds, 2),
        requests=result.requests,
        non_2xx=result.status_errors,
        socket_errors=result.socket_errors,
        capacity_per_s=round((result.requests - result.status_errors) / seconds, 1),
        server_cpu_per_request_us=None
        if cores.server is None or not result.requests
        else round(cores.server * seconds / result.requests * 1e6, 1),
        p50_ms=result.p50_us / 1000,
        p99_ms=result.p99_us / 1000,
        cores=cores,
    )


def _overload(
    factor: float, capacity: Capacity, result: OpenLoopResult, used: CpuUsed, shed: int
) -> Overload:
    admitted = result.statuses.get("2xx", NONE_ADMITTED)
    goodput = admitted.requests / result.duration_s
    failed = result.errors - result.non_2xx
    server_s = used.processes.get("server")
    per_request = capacity.server_cpu_per_request_us
    shed_us = bound = None
    if server_s is not None and per_request is not None and shed:
        shed_us = max(0.0, (server_s * 1e6 - admitted.requests * per_request) / shed)
        share = capacity.capacity_per_s * shed_us / 1e6  # C*s
        bound = max(0.0, (1 - factor * share) / (1 - share)) if share < 1 else 0.0
    return Overload(
        factor=factor,
        offered_per_s=round(result.rate_per_s, 1),
        goodput_per_s=round(goodput, 1),
        goodput_ratio=round(goodput / capacity.capacity_per_s, 3),
        shed_503=result.error_codes.get(SHED_CODE, 0),
        shed_server_side=shed,
        other_non_2xx={k: v for k, v in result.error_codes.items() if k != SHED_CODE},
        failed=failed,
        failures=result.failures,
        server_cpu_per_shed_us=None if shed_us is None else round(shed_us, 1),
        goodput_bound=None if bound is None else round(bound, 3),
        admitted=admitted,
        shed_latency=result.statuses.get("503"),
        generator_cores=result.client_cores,
        cores=cores_of(used),
        open_loop=result,
    )


def _recovery(factor: float, result: OpenLoopResult, cores: Cores, after_s: float) -> Recovery:
    first = result.per_second[0] if result.per_second else None
    return Recovery(
        factor=factor,
        offered_per_s=round(result.rate_per_s, 1),
        started_after_s=round(after_s, 2),
        first_second_p99_ms=None if first is None else first.p99_2xx_ms,
        all_2xx=result.errors == 0 and result.completed == result.scheduled,
        generator_cores=result.client_cores,
        cores=cores,
        open_loop=result,
    )


if __name__ == "__main__":
    sys.exit(main())
