"""Commands/s for POST /api/scenarios on PostgreSQL, group commit against the stock path,
measured in one run on one database: the same API processes' code, started with
ACCUBOOKS_GROUP_COMMIT=false (one transaction per command: the eventsourcing library's
stock path) and with group commit on, at 8 and 32 concurrent clients, in alternating
rounds. Then it checks idempotency on everything the run wrote: one receipt and exactly one
scenario per key, replays byte for byte identical, a reused key with another body 422.

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user
postgres, and wrk):

    .venv/bin/python -m perf.commands_bench

Load: wrk with perf/commands_post.lua (a fresh Idempotency-Key per request), one wrk per
API process, the clients split evenly. Several API processes on their own ports stand for
processes behind a load balancer. Percentiles of a phase are the highest among its wrk
processes (they cannot be merged exactly).

It creates and drops its own database, prints the table and writes
perf/reports/commands.md and perf/reports/commands.json. Exits 1 when a phase had errors or
an idempotency check failed. `run()` is the same without argument parsing or report files.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from infra.settings import Settings
from perf.commands_checks import SCENARIO_BODY, Server, check_idempotency
from perf.commands_profile import profile_lines, profiling
from perf.commands_report import (
    TARGET_COMMANDS_PER_S,
    TARGET_RATIO,
    Machine,
    Phase,
    Report,
    Summary,
    render_markdown,
)
from perf.cpu import CpuMeter
from perf.harness import (
    ADMIN_URL,
    REQUEST_TIMEOUT_S,
    ROOT,
    Deadline,
    git_head,
    postgres_database,
    write_report,
)
from perf.machine import postgres_version, tool_version, uvicorn_loop_http
from perf.processes import accubooks_json, api_process, stop_on_signals
from perf.wrk import OVERRUN_S, RESULT_MARK, Wrk

LUA = ROOT / "perf" / "commands_post.lua"
PATHS = {
    "stock": {"ACCUBOOKS_GROUP_COMMIT": "false"},
    "group": {"ACCUBOOKS_GROUP_COMMIT": "true"},
}


# --- load -------------------------------------------------------------------------------


def _wrk_command(
    server: Server, clients: int, seconds: float, bearer: str, body: Path
) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{clients}",
        f"-d{seconds:g}s",
        f"--timeout={REQUEST_TIMEOUT_S:g}s",
        "-s",
        str(LUA.relative_to(ROOT)),
        server.url,
        "--",
        uuid.uuid4().hex[:12],
        bearer,
        str(body),
    ]


def load(
    servers: list[Server],
    clients: int,
    seconds: float,
    bearer: str,
    body: Path,
    deadline: Deadline,
    cpu: CpuMeter | None,
) -> tuple[list[Wrk], float, dict[str, float]]:
    """One wrk per server, ``clients`` split evenly, all at once: their results, the wall
    seconds, and CPU per process kind (seconds) when ``cpu`` is given."""
    if deadline.remaining() < seconds + 5:
        raise SystemExit("the budget ran out before a load phase")
    shares = [clients // len(servers) + (i < clients % len(servers)) for i in range(len(servers))]
    if cpu is not None:
        cpu.start()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            _wrk_command(server, share, seconds, bearer, body),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for server, share in zip(servers, shares, strict=True)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=seconds + OVERRUN_S))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise SystemExit("wrk did not finish in time") from None
    wall = time.perf_counter() - started
    used: dict[str, float] = {}
    if cpu is not None:
        meter = cpu.stop()
        api = [s for s in meter.processes.values() if s is not None]
        if len(api) == len(servers):
            used["api"] = sum(api)
        if meter.postgres_s is not None and meter.postgres_backends:
            used["postgres"] = meter.postgres_s
        used["loadgen"] = meter.children_s
        used["machine"] = meter.machine_s
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        found = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
        if not found:
            raise SystemExit(f"wrk failed ({proc.returncode}): {stdout[-500:]} {stderr[-500:]}")
        results.append(msgspec.json.decode(found[0].removeprefix(RESULT_MARK), type=Wrk))
    return results, wall, used


def measure(
    path: str,
    servers: list[Server],
    clients: int,
    round_: int,
    seconds: float,
    bearer: str,
    body: Path,
    deadline: Deadline,
    database_url: str,
) -> Phase:
    cpu = CpuMeter({f"api{i}": s.pid for i, s in enumerate(servers)}, database_url)
    results, wall, used = load(servers, clients, seconds, bearer, body, deadline, cpu)
    completed = sum(r.requests for r in results)
    duration = max(r.duration_us for r in results) / 1e6

    def per_command(kind: str) -> float | None:
        return used[kind] / completed * 1e6 if kind in used and completed else None

    return Phase(
        path=path,
        clients=clients,
        round=round_,
        seconds=round(duration, 3),
        completed=completed,
        commands_per_s=completed / duration if duration > 0 else 0.0,
        p50_ms=max(r.p50_us for r in results) / 1000,
        p95_ms=max(r.p95_us for r in results) / 1000,
        p99_ms=max(r.p99_us for r in results) / 1000,
        non_2xx=sum(r.status_errors for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        api_cpu_us=per_command("api"),
        postgres_cpu_us=per_command("postgres"),
        loadgen_cpu_us=per_command("loadgen") or 0.0,
        machine_busy_pct=used.get("machine", 0.0) / wall * 100,
    )


def summarize(phases: list[Phase]) -> list[Summary]:
    groups: dict[tuple[str, int], list[Phase]] = collections.defaultdict(list)
    for phase in phases:
        groups[(phase.path, phase.clients)].append(phase)
    found = []
    for (path, clients), rounds in sorted(groups.items()):
        ordered = sorted(rounds, key=lambda p: p.commands_per_s)
        median = ordered[(len(ordered) - 1) // 2]
        found.append(
            Summary(
                path=path,
                clients=clients,
                commands_per_s=statistics.median(p.commands_per_s for p in rounds),
                p50_ms=median.p50_ms,
                p95_ms=median.p95_ms,
                p99_ms=median.p99_ms,
                api_cpu_us=median.api_cpu_us,
                postgres_cpu_us=median.postgres_cpu_us,
            )
        )
    return found


# --- the run ----------------------------------------------------------------------------


def machine_facts(admin_url: str) -> Machine:
    return Machine(
        nproc=len(os.sched_getaffinity(0)),
        loadavg_1m_at_start=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        postgres=postgres_version(admin_url),
        wrk=tool_version(["wrk", "--version"]),
        server=f"uvicorn ({uvicorn_loop_http()})",
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        git_head=git_head(),
    )


def run(
    deadline_s: float,
    *,
    seconds: float = 8.0,
    rounds: int = 2,
    api_processes: int = 2,
    client_counts: tuple[int, ...] = (8, 32),
    replay_sample: int = 256,
    profile: bool = False,
    admin_url: str = ADMIN_URL,
    command: str = ".venv/bin/python -m perf.commands_bench",
) -> Report:
    """The whole benchmark within ``deadline_s`` seconds: its report (not written)."""
    deadline = Deadline(time.monotonic() + deadline_s)
    machine = machine_facts(admin_url)
    phases: list[Phase] = []
    acknowledged = in_flight = 0
    lines: list[str] = []
    with (
        postgres_database(admin_url) as database_url,
        tempfile.TemporaryDirectory() as tmp,
        ExitStack() as stack,
    ):
        tenant = accubooks_json(["tenants", "create", "perf"], database_url, deadline)
        key = accubooks_json(
            ["keys", "issue", tenant["tenantId"], "--role", "writer"], database_url, deadline
        )
        bearer = str(key["key"])
        body = Path(tmp) / "body.json"
        body.write_bytes(SCENARIO_BODY)
        servers = {
            path: [
                Server(*stack.enter_context(api_process(database_url, env, deadline)))
                for _ in range(api_processes)
            ]
            for path, env in PATHS.items()
        }

        def count(results: list[Wrk], clients: int) -> None:
            nonlocal acknowledged, in_flight
            acknowledged += sum(r.requests - r.status_errors for r in results)
            in_flight += clients

        for path in PATHS:
            results, _, _ = load(servers[path], 8, 2.0, bearer, body, deadline, None)
            count(results, 8)
        for round_ in range(1, rounds + 1):
            for clients in client_counts:
                for path in PATHS:
                    last = round_ == rounds and clients == max(client_counts)
                    raw = Path(tmp) / "profile.raw"
                    with ExitStack() as spying:
                        if profile and last and path == "group":
                            spying.enter_context(profiling(servers[path][0].pid, seconds, raw))
                        phase = measure(
                            path,
                            servers[path],
                            clients,
                            round_,
                            seconds,
                            bearer,
                            body,
                            deadline,
                            database_url,
                        )
                    if profile and last and path == "group":
                        lines = profile_lines(raw)
                    print(
                        f"{path} x{clients} round {round_}: {phase.commands_per_s:,.0f}/s",
                        file=sys.stderr,
                        flush=True,
                    )
                    phases.append(phase)
                    acknowledged += phase.completed - phase.non_2xx
                    in_flight += clients
        idempotency = check_idempotency(
            database_url,
            [s for group in servers.values() for s in group],
            bearer,
            acknowledged,
            in_flight,
            replay_sample,
        )

    summaries = summarize(phases)
    rate = {(s.path, s.clients): s.commands_per_s for s in summaries}

    def ratio(clients: int) -> float:
        stock = rate.get(("stock", clients), 0.0)
        return rate.get(("group", clients), 0.0) / stock if stock > 0 else float("nan")

    top = max(client_counts)
    ok = (
        not deadline.expired()
        and idempotency.ok
        and all(p.non_2xx == 0 and p.socket_errors == 0 and p.completed > 0 for p in phases)
    )
    return Report(
        ok=ok,
        command=command,
        machine=machine,
        api_processes=api_processes,
        rounds=rounds,
        phase_seconds=seconds,
        group_commit_max=Settings().group_commit_max,
        phases=phases,
        summaries=summaries,
        group_over_stock_8=ratio(8),
        group_over_stock_32=ratio(32),
        meets_commands_per_s=rate.get(("group", top), 0.0) >= TARGET_COMMANDS_PER_S,
        meets_ratio=ratio(top) >= TARGET_RATIO,
        idempotency=idempotency,
        profile=lines,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perf.commands_bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--replay-sample", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="py-spy the group path")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="global time budget")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.api_processes < 1:
        raise SystemExit("--seconds, --rounds and --api-processes must be positive")
    stop_on_signals()
    report = run(
        args.timeout_s,
        seconds=args.seconds,
        rounds=args.rounds,
        api_processes=args.api_processes,
        replay_sample=args.replay_sample,
        profile=args.profile,
        admin_url=args.admin_url,
        command=" ".join([".venv/bin/python -m perf.commands_bench", *(argv or sys.argv[1:])]),
    )
    markdown = render_markdown(report)
    write_report("commands", markdown, report)
    print(markdown)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
