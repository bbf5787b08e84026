"""Rebuild speed on PostgreSQL: write a log of --events events (100 aggregates per save),
build the live read models with `accubooks projections rebuild --switch`, time
`accubooks audit verify` over every tenant's chain, then time
`accubooks projections rebuild --verify` of every read model against them: events/s and
the peak RSS of each command's process (it streams the log, so memory must not grow with
it).

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user postgres):

    .venv/bin/python -m perf.rebuild_bench --events 1000000

Options: --events 1000000 --batch-size 2000 --budget-s 3600. It creates and drops its own
database (perf_<random>), writes perf/reports/rebuild.md and perf/reports/rebuild.json,
and exits 1 when a phase does not finish within the budget or the verify finds a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg

from commands import tenants
from commands.context import Collaborators
from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from perf.harness import ROOT, Deadline, git_head, postgres_database, write_report
from perf.processes import PeakRss, family
from perf.seeding import SAVE_AGGREGATES, scenario_history
from projections import rebuild as rebuilder

TENANTS = 10
POLL_S = 0.2

# What profiling the rebuild showed (py-spy on `rebuild --switch`/`--verify` over a 200,000
# event log, cProfile and per-process CPU of each read model over 40,000 events; 2026-11-29,
# on this machine while other benchmarks ran). Kept with the figures it explains.
PROFILE = """\
## What the profile showed

Before (py-spy, `rebuild --switch`, 200k events): the six apply threads spent most of their
samples waiting on the server, one round trip after another: the queue read model wrote one
statement per event (10.5 % of all samples), the others one `executemany` row at a time, and
each batch paid BEGIN, two SETs, the tracking insert and COMMIT as separate round trips.
cProfile of each read model alone showed the largest Python cost inside psycopg's text
dumping of parameters (regular-expression escaping: 2.4 s of 6.6 s for the scenarios model);
the library's page read (a dict per row) and decoder (a Python hook per JSON object) cost
about 5 + 14 us per event; the read models about 70 us per event together (scenarios 31,
audit 27, forecasts 23, dashboard 8, usage 4.5, queue 3.5), PostgreSQL about 30 us.

Changes, each measured on the same log in the same session: set-based writes (one `INSERT
... SELECT FROM unnest(...)` or `UPDATE ... FROM unnest(...)` per table and batch, arrays
sent in binary: Python CPU of the read models -35 %, the queue model 3.3x faster); a
pipeline per batch (its statements sent without waiting, one sync at the end: wall time of
the six models applied one after the other 7.5 s -> 5.6 s for 40k events); cached text forms
of ids and times (each event is formatted by six models); `infra.logreader` (one plain
statement per page, tuples, binary bytea, msgspec decoding into the same event objects:
read+decode CPU 1.08-1.26 s -> 0.65-0.85 s per 40k events); the first replay split between
2 processes (200k events: wall 147 s -> 114 s, 1.29x, for 30 % more CPU, as each process
reads and decodes the whole log). Same session, the first replay alone (no compare or
switch) of 200k events in 1 process: before 193 s wall, 30.2 s CPU (6,600 events per CPU
second); after 106 s wall, 18.2 s CPU (11,000 events per CPU second): 1.8x the wall rate,
1.66x less CPU per event.

After (py-spy of `rebuild --verify` with the replay processes, busy samples only): read
and decode 33 % (before the log reader), read-model Python about 50 % (scenarios 13,
audit 11, forecasts 10, dashboard 7, queue 4, usage 3), waiting on the server 21 %.

The gap: 50,000 events/s on 2 cores leaves 40 us of CPU per event for everything (our
Python and PostgreSQL). This design spends about 16 us reading and decoding (per process),
about 55 us in the six read models' Python and about 30 us in PostgreSQL: roughly 100 us
per event, so about 18-20k events/s on two idle cores is the ceiling without moving the
read models' per-event work out of Python (or giving up the one-decoding-for-all design).
The 1M figures above were taken while other benchmarks ran on the same 2 cores (load
average 13 at the start, 15-24 during `--switch`, 4 at the end): compare each with `audit
verify` of the same run. The 1M run of 2026-11-29 14:30: `--switch` at 0.15x and `--verify`
at 0.32x the rate of `audit verify`, against 0.10x and 0.11x before these changes (4,002 and
4,333 against 38,347 events/s). CPU per event does not compare across runs either: it grows
with contention, and the two replay processes each decode the whole log (+30 % CPU for
1.29x the wall rate).
"""


class Run(msgspec.Struct, frozen=True, kw_only=True):
    command: str
    exit_code: int
    seconds: float
    events: int
    events_per_s: float
    replay_seconds: float
    differences: int
    # The largest process (wait4: the command and its replay processes, each).
    peak_rss_mb: float
    # The command's processes added up (sampled every 0.2 s).
    peak_rss_total_mb: float
    processes: int
    cpu_seconds: float
    # Events per CPU second of the command's processes (ours, not PostgreSQL's): on a
    # shared machine, less noisy than events/s.
    events_per_cpu_s: float


class AuditRun(msgspec.Struct, frozen=True, kw_only=True):
    """`accubooks audit verify` over the whole log (every tenant's chain)."""

    command: str
    exit_code: int
    seconds: float
    events: int
    events_per_s: float
    findings: int
    peak_rss_mb: float
    cpu_seconds: float


class Report(msgspec.Struct, frozen=True, kw_only=True):
    events: int
    write_seconds: float
    write_events_per_s: float
    batch_size: int
    switch: Run | None
    verify: Run | None
    audit_verify: AuditRun | None
    finished: bool
    machine: dict[str, Any]


def write_log(log: EventLog, events: int, deadline: Deadline) -> int:
    """About ``events`` events: per scenario a creation and a rename, two forecast
    requests, every tenth scenario archived; SAVE_AGGREGATES aggregates per save."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    tenant_ids = [tenants.create_tenant(deps, f"Tenant {n}").tenant_id for n in range(TENANTS)]
    written, index = len(tenant_ids), 0
    pending: list[Scenario | Forecast] = []
    while written < events or pending:
        if deadline.expired():
            raise SystemExit("the budget ran out while writing the log")
        if written >= events or len(pending) >= SAVE_AGGREGATES:
            log.save(*pending)
            pending.clear()
            continue
        tenant_id = tenant_ids[index % TENANTS]
        actor = Actor(tenant_id=tenant_id, actor_id="bench", request_id=str(index))
        aggregates, count = scenario_history(actor, index)
        pending.extend(aggregates)
        written += count
        index += 1
    return log.position()


@dataclass
class Child:
    exit_code: int
    seconds: float
    peak_rss_mb: float
    peak_rss_total_mb: float
    processes: int
    cpu_seconds: float
    stdout: str
    stderr: str


def run_cli(settings: Settings, args: list[str], deadline: Deadline) -> Child | None:
    """`accubooks ARGS` in its own process; its exit code, wall time, peak RSS and CPU
    (from wait4), or None when the budget ran out (it is killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUBOOKS_")}
    env.pop("REDIS_URL", None)
    env.pop("BROKER_URL", None)
    env["DATABASE_URL"] = settings.database_url or ""
    env["ACCUBOOKS_DATA_DIR"] = settings.data_dir
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )
        rss = PeakRss(proc.pid).start()
        most = 1
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline.expired():
                proc.kill()
                proc.wait()
                rss.stop()
                return None
            most = max(most, len(family(proc.pid)))
            time.sleep(POLL_S)
        rss.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return Child(
            exit_code=proc.returncode,
            seconds=seconds,
            peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            peak_rss_total_mb=rss.total_bytes / 2**20,
            processes=most,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            stdout=out.read(),
            stderr=err.read()[-3000:],
        )


def timed(settings: Settings, args: list[str], deadline: Deadline) -> Run | None:
    child = run_cli(settings, [*args, "--json"], deadline)
    command = "accubooks " + " ".join([*args, "--json"])
    if child is None:
        print(f"{command}: did not finish within the budget", flush=True)
        return None
    if child.exit_code not in (0, 1):
        print(f"{command}: exit {child.exit_code}\n{child.stderr}", flush=True)
        return None
    report = json.loads(child.stdout)
    run = Run(
        command=command,
        exit_code=child.exit_code,
        seconds=round(child.seconds, 2),
        events=report["events"],
        events_per_s=round(report["events"] / child.seconds, 1),
        replay_seconds=report["replaySeconds"],
        differences=report["differences"],
        peak_rss_mb=round(child.peak_rss_mb, 1),
        peak_rss_total_mb=round(child.peak_rss_total_mb, 1),
        processes=child.processes,
        cpu_seconds=round(child.cpu_seconds, 2),
        events_per_cpu_s=round(report["events"] / max(child.cpu_seconds, 1e-9), 1),
    )
    print(f"{command}: {run}", flush=True)
    return run


def audit_verify(settings: Settings, deadline: Deadline) -> AuditRun | None:
    command = "accubooks audit verify --json"
    child = run_cli(settings, ["audit", "verify", "--json"], deadline)
    if child is None or child.exit_code not in (0, 1):
        print(f"{command}: failed\n{child.stderr if child else 'over budget'}", flush=True)
        return None
    found = json.loads(child.stdout)
    run = AuditRun(
        command=command,
        exit_code=child.exit_code,
        seconds=round(child.seconds, 2),
        events=found["eventsRead"],
        events_per_s=round(found["eventsRead"] / child.seconds, 1),
        findings=len(found["findings"]) + found["logFindings"],
        peak_rss_mb=round(child.peak_rss_mb, 1),
        cpu_seconds=round(child.cpu_seconds, 2),
    )
    print(f"{command}: {run}", flush=True)
    return run


def markdown(report: Report) -> str:
    lines = [
        "# Rebuild benchmark: `accubooks projections rebuild` on PostgreSQL",
        "",
        f"`.venv/bin/python -m perf.rebuild_bench --events {report.events}"
        f" --batch-size {report.batch_size}` — {'ok' if report.finished else 'NOT FINISHED'}",
        "",
        f"Log: {report.events:,} events written in {report.write_seconds:.1f} s"
        f" ({report.write_events_per_s:,.0f} events/s, {SAVE_AGGREGATES} aggregates per"
        " save: per scenario a creation, a rename and two forecast requests, every tenth"
        f" archived; {TENANTS} tenants).",
        "",
        "| command | exit | s | events read | events/s | first replay s |"
        " differences | peak RSS MB (largest process / all) | processes | CPU s |"
        " events per CPU s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in (report.switch, report.verify):
        if run is not None:
            lines.append(
                f"| `{run.command}` | {run.exit_code} | {run.seconds:.1f} | {run.events:,} |"
                f" {run.events_per_s:,.0f} | {run.replay_seconds:.1f} | {run.differences} |"
                f" {run.peak_rss_mb:.0f} / {run.peak_rss_total_mb:.0f} | {run.processes} |"
                f" {run.cpu_seconds:.1f} | {run.events_per_cpu_s:,.0f} |"
            )
    if report.audit_verify is not None:
        a = report.audit_verify
        lines += [
            "",
            "| command | exit | s | events read | events/s | findings | peak RSS MB | CPU s |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
            f"| `{a.command}` | {a.exit_code} | {a.seconds:.1f} | {a.events:,} |"
            f" {a.events_per_s:,.0f} | {a.findings} | {a.peak_rss_mb:.0f} | {a.cpu_seconds:.1f} |",
            "",
            "`audit verify` recomputes every tenant's hash chain from the raw stored events"
            " and compares it with the audit read model's chain (built by the `--switch` run);"
            " events/s over the command's whole wall time, process start included.",
        ]
    lines += [
        "",
        "`--switch` replays the log into empty shadow tables of every read model and moves"
        " them in place of the live ones (here: the live read models are built this way)."
        " `--verify` replays again into fresh shadows, then compares each with its live"
        " read model row by row at the live model's position (one full join per table in"
        " the database). Events/s is the events read from the log (each applied to all"
        " six read models) over the command's whole wall time, process start included;"
        " the first-replay column is the part spent replaying from position 0, the rest"
        " is catching up, comparing and switching. Peak RSS is the command's own process"
        " (wait4), which streams the log in batches.",
        "",
        f"Machine: {json.dumps(report.machine)}.",
        "",
        PROFILE,
    ]
    return "\n".join(lines) + "\n"


def run(
    *, events: int = 1_000_000, batch_size: int = rebuilder.DEFAULT_BATCH, budget_s: float = 3600.0
) -> Report:
    """The benchmark; its report (not written)."""
    deadline = Deadline(time.monotonic() + budget_s)
    machine: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_head": git_head(),
    }
    with postgres_database() as url, tempfile.TemporaryDirectory() as data_dir:
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            machine["postgres"] = row[0] if row else "?"
        settings = Settings(database_url=url, data_dir=data_dir)
        log = open_event_log(settings)
        try:
            started = time.monotonic()
            end = write_log(log, events, deadline)
            write_s = time.monotonic() - started
        finally:
            log.close()
        print(f"log written: {end:,} events in {write_s:.1f} s", flush=True)
        batch = ["--batch-size", str(batch_size)]
        switch = timed(settings, ["projections", "rebuild", "--switch", *batch], deadline)
        verify = checked = None
        if switch is not None:
            checked = audit_verify(settings, deadline)
            verify = timed(settings, ["projections", "rebuild", "--verify", *batch], deadline)
    machine["load_average_end"] = os.getloadavg()[0]
    machine["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    finished = (
        verify is not None
        and verify.exit_code == 0
        and checked is not None
        and checked.exit_code == 0
    )
    return Report(
        events=end,
        write_seconds=round(write_s, 2),
        write_events_per_s=round(end / write_s, 1),
        batch_size=batch_size,
        switch=switch,
        verify=verify,
        audit_verify=checked,
        finished=finished,
        machine=machine,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=rebuilder.DEFAULT_BATCH)
    parser.add_argument("--budget-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    report = run(events=args.events, batch_size=args.batch_size, budget_s=args.budget_s)
    text = markdown(report)
    print(text)
    write_report("rebuild", text, report)
    return 0 if report.finished else 1


if __name__ == "__main__":
    sys.exit(main())
