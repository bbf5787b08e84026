"""Read-path throughput on PostgreSQL + Redis: the seed's read mix at 100 connections
(wrk, 2 threads, perf/read_mix.lua) against `accubooks api --workers N` with the Redis
cache on, with the cache off, and with Redis stopped under it; quoted against a bare
Starlette JSON hello served the same way (service.draining.serve, the same worker count)
before and after, in the same run, so the ratios survive a shared and noisy machine. With
the cache on, the same process then takes an open-loop phase (perf/openloop.py, 1,000
req/s by default): p50/p95/p99 per endpoint. The server's peak RSS is sampled under load.

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user
postgres, and the Debian packages redis-server and wrk: `apt-get install -y wrk`):

    .venv/bin/python -m perf.read_bench

Options: --tenants 20 --scenarios 200 --forecasts 2 --duration-s 20 --warmup-s 5
--connections 100 --threads 2 --workers 1 --open-loop-rate 1000 --open-loop-s 20
--budget-s 600 (see --help); `run(argv)` returns the report without writing it. It
creates and drops its own database, starts a private redis-server on a free port (never
the shared one), seeds the log through the domain aggregates and the tenant commands
(never read-model rows), lets `accubooks project` build the read models, talks only to
127.0.0.1, prints the table and writes perf/reports/read_path.md and .json. Exits 1 when a
phase has errors or non-2xx answers, when its sampled answers do not carry the service status the
phase promises, or when the budget runs out; every process it started is stopped.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx2 as httpx
import msgspec

from infra.eventstore import open_event_log
from infra.settings import Settings
from perf import api_metrics, read_mix
from perf.cpu import CpuMeter
from perf.harness import ADMIN_URL, REQUEST_TIMEOUT_S, Deadline, postgres_database, write_report
from perf.openloop import OpenLoopResult, open_loop
from perf.processes import (
    PeakRss,
    api_process,
    family,
    hello_server,
    private_redis,
    stop_on_signals,
)
from perf.read_mix import MIX, Sample
from perf.read_report import Phase, Report, Seeding, cores_of, machine_facts, render_markdown
from perf.seeding import project_until_caught_up, seed_tenants
from perf.wrk import LoadShape, PlanLine, Wrk, read_plan, run_wrk, write_plan, wrk_command

# The serving chosen by measurement (perf/reports/read_path.md): service.draining.serve.
SERVING = "uvicorn's protocol with httptools on uvloop"
WORKERS = 2


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
    before = api_metrics.scrape(target.url) if api else {}
    servers = family(target.pid)
    watched = {"server" if i == 0 else f"server {i + 1}": pid for i, pid in enumerate(servers)}
    if target.redis_pid is not None:
        watched["redis"] = target.redis_pid
    meter = CpuMeter(watched, target.database_url)
    command = wrk_command(target.url, target.plan, shape, shape.duration_s)
    rss = PeakRss(target.pid).start()
    meter.start()
    result = run_wrk(command, shape.duration_s, deadline)
    cores = cores_of(meter.stop())
    rss.stop()
    after = api_metrics.scrape(target.url) if api else {}
    checked = read_mix.sample(target.url, read_plan(target.plan), rng)
    seconds = result.duration_us / 1e6
    problems = _problems(result, checked, target.expect_degraded)
    lookups = {
        outcome: api_metrics.delta(before, after, "accubooks_cache_requests_total", result=outcome)
        for outcome in ("memory", "hit", "miss", "error")
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
        socket_errors=result.socket_errors,
        bytes_per_request=round(result.bytes / max(1, result.requests), 1),
        cores=cores,
        cache_hits=lookups.get("hit"),
        cache_memory_hits=lookups.get("memory"),
        cache_misses=lookups.get("miss"),
        cache_errors=lookups.get("error"),
        shed=api_metrics.delta(before, after, "accubooks_shed_requests_total") if api else None,
        routes=api_metrics.route_times(before, after),
        sample=checked,
        expect_degraded=target.expect_degraded,
        rss_peak_mb=round(rss.total_bytes / 2**20, 1),
        rss_peak_per_process_mb=round(rss.per_process_bytes / 2**20, 1),
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
    if errors := result.socket_errors:
        problems.append(f"{errors} socket errors or timeouts")
    if checked.ok_200 != checked.requests:
        problems.append(f"sampled answers not 200: {checked.statuses}")
    if expect_degraded is True and checked.degraded != checked.requests:
        problems.append(f"only {checked.degraded}/{checked.requests} sampled answers degraded")
    if expect_degraded is False and checked.degraded:
        problems.append(f"{checked.degraded}/{checked.requests} sampled answers degraded")
    return problems


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
    parser.add_argument(
        "--workers", type=int, default=WORKERS, help="API (and hello) processes on the port"
    )
    parser.add_argument("--open-loop-rate", type=float, default=1000.0, help="req/s; 0: skip")
    parser.add_argument("--open-loop-s", type=float, default=20.0)
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
    report = run(argv)
    markdown = render_markdown(report)
    write_report("read_path", markdown, report)
    print(markdown)
    return 0 if report.ok else 1


def run(argv: list[str] | None = None) -> Report:
    """The whole benchmark (options as on the command line): its report, not written."""
    args = _parser().parse_args(argv)
    if args.connections < args.threads or min(args.tenants, args.scenarios, args.forecasts) < 1:
        raise SystemExit("need tenants, scenarios, forecasts >= 1 and connections >= threads")
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y {tool}")
    stop_on_signals()
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
            counts, reads = seed_tenants(
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
        write_plan(plan, read_mix.draw_plan(reads, args.plan, rng))
        hello_plan = Path(tmp) / "hello.tsv"
        write_plan(hello_plan, [PlanLine("hello", "/", None)])

        def hello(name: str) -> Phase:
            with hello_server(deadline, workers=args.workers) as (url, pid):
                target = Target(name=name, server="hello", url=url, pid=pid, plan=hello_plan)
                return measure(target, shape, deadline, rng)

        opened: list[tuple[OpenLoopResult, float]] = []

        def api(name: str, extra: dict[str, str], degraded: bool, open_s: float = 0.0) -> Phase:
            env = {**api_env, **extra}
            with api_process(database_url, env, deadline, workers=args.workers) as (url, pid):
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
                phase = measure(target, shape, deadline, rng)
                if open_s > 0 and args.open_loop_rate > 0:
                    if deadline.remaining() < open_s + 30:
                        raise SystemExit("the budget ran out before the open-loop phase")
                    print(f"open loop: {args.open_loop_rate:g} req/s", file=sys.stderr)
                    rss = PeakRss(pid).start()
                    result = open_loop(url, read_plan(plan), args.open_loop_rate, open_s)
                    opened.append((result, round(rss.stop().total_bytes / 2**20, 1)))
                return phase

        try:
            phases.append(hello("hello (before)"))
            on = {"REDIS_URL": cache.url}
            phases.append(api("cache on", on, degraded=False, open_s=args.open_loop_s))
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
    looped = opened[0] if opened else None
    if looped is not None and looped[0].errors:
        problems.append(f"open loop: {looped[0].errors} errors")
    return Report(
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
        serving=SERVING,
        workers=args.workers,
        open_loop=looped[0] if looped else None,
        open_loop_rss_peak_mb=looped[1] if looped else None,
    )


if __name__ == "__main__":
    sys.exit(main())
