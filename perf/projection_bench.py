"""Projection speed on PostgreSQL: catch-up throughput of the four read models over 100,000
events, quoted against a baseline measured in the same run (reading and decoding the same
notifications in pages of 500, with no projection work), and the latency from a command's
201 to the scenario being readable, with `accubooks api` and `accubooks project` running
as separate processes (the production topology, pushed by LISTEN/NOTIFY).

Run from the repository root (needs PostgreSQL on 127.0.0.1:5432, trust auth, user postgres):

    .venv/bin/python -m perf.projection_bench

Options: --events 100000 --commands 300 --budget-s 900. It creates and drops its own
database (perf_<random>), talks only to 127.0.0.1, prints the report and writes
perf/reports/projections.md and perf/reports/projections.json. Every phase is bounded by
the budget; it exits 1 when a phase does not finish or a command is not seen.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime

import httpx2 as httpx
import msgspec

from commands import tenants
from commands.context import Collaborators
from domain.events import Actor
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from perf import lag_bench
from perf.harness import (
    ADMIN_URL,
    REQUEST_TIMEOUT_S,
    Deadline,
    git_head,
    postgres_database,
    write_report,
)
from perf.machine import postgres_version
from perf.processes import accubooks
from perf.seeding import SAVE_AGGREGATES, SCENARIO_BODY, SaveBatch, scenario_history
from projections.readmodel import Projector
from projections.runner import ProjectionRunner
from service import wiring

PAGE = 500  # the runner's batch size, and the baseline's page
# The longest one command may take to become readable before it counts as not seen.
VISIBILITY_TIMEOUT_S = 10.0
SAMPLE_S = 0.05  # how often the catch-up's positions are sampled


class Throughput(msgspec.Struct, frozen=True, kw_only=True):
    events: int
    seconds: float
    events_per_s: float
    # CPU seconds this process used per wall second (> 1 means threads ran in parallel).
    cpu_per_wall: float


class CatchUp(Throughput, frozen=True, kw_only=True):
    finished: bool
    # When each projection reached the last position, seconds after the start.
    per_projection_s: dict[str, float]
    # Each projection's rate over the first and the last fifth of the log: a rate that
    # falls as the read models grow shows work that grows with the tables.
    first_fifth_events_per_s: dict[str, float]
    last_fifth_events_per_s: dict[str, float]


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    commands: int
    visible: int
    not_visible: int
    failed: int
    ack_p50_ms: float
    visible_p50_ms: float
    visible_p95_ms: float
    visible_p99_ms: float
    visible_max_ms: float
    # The round trip of one read, the resolution of the visibility figures.
    read_p50_ms: float
    visible_on_first_read: int


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    loadavg_1m_at_start: float
    loadavg_1m_at_end: float
    python: str
    postgres: str
    date: str
    git_head: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: Machine
    bulk_write: Throughput
    baseline: Throughput
    catch_up: CatchUp
    # Each projection alone in the process, into an empty database of its own.
    solo: dict[str, CatchUp]
    catch_up_over_baseline: float
    # Every projection reads and decodes the whole log itself: the share of the catch-up
    # that four such reads would take if they ran one after another (one GIL).
    read_decode_share: float
    latency: Latency | None


# --- the database and the log ---------------------------------------------------------------


def write_bulk(log: EventLog, events: int, deadline: Deadline) -> Throughput:
    """About ``events`` events, SAVE_AGGREGATES per save: per scenario a creation and a
    rename, two forecast requests, every tenth scenario archived; ten tenants."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    tenant_ids = [tenants.create_tenant(deps, f"Tenant {n}").tenant_id for n in range(10)]
    written = len(tenant_ids)
    batch = SaveBatch(log, SAVE_AGGREGATES)
    index = 0
    started, cpu = time.perf_counter(), time.process_time()
    while written < events:
        if deadline.expired():
            raise SystemExit("the budget ran out while writing the log")
        actor = Actor(
            tenant_id=tenant_ids[index % len(tenant_ids)], actor_id="bench", request_id=str(index)
        )
        aggregates, count = scenario_history(actor, index)
        batch.add(*aggregates)
        written += count
        index += 1
    batch.flush()
    return _throughput(written, started, cpu)


def _throughput(events: int, started: float, cpu_started: float) -> Throughput:
    seconds = time.perf_counter() - started
    return Throughput(
        events=events,
        seconds=round(seconds, 3),
        events_per_s=round(events / seconds, 1),
        cpu_per_wall=round((time.process_time() - cpu_started) / seconds, 2),
    )


# --- the measurements -------------------------------------------------------------------


def read_and_decode(log: EventLog, end: int, deadline: Deadline) -> Throughput:
    """The baseline: what a projection must do before any work of its own, i.e. page the
    log by PAGE and decode every event."""
    started, cpu = time.perf_counter(), time.process_time()
    position = count = 0
    while position < end and not deadline.expired():
        page = log.recorder.select_notifications(
            start=position, limit=PAGE, inclusive_of_start=False
        )
        if not page:
            break
        for notification in page:
            log.mapper.to_domain_event(notification)
        count += len(page)
        position = page[-1].id
    return _throughput(count, started, cpu)


def catch_up(runner: ProjectionRunner, end: int, deadline: Deadline) -> CatchUp:
    """The runner's workers from position 0 to ``end``, timed from their start (tables
    already created) until the last one gets there; their positions sampled on the way."""
    reached: dict[str, float] = {}
    samples: list[tuple[float, dict[str, int]]] = []
    try:
        started, cpu = time.perf_counter(), time.process_time()
        runner.start()

        def watch(name: str) -> None:
            if runner.workers[name].wait_for(end, deadline.remaining()):
                reached[name] = round(time.perf_counter() - started, 3)

        watchers = [threading.Thread(target=watch, args=(name,)) for name in runner.workers]
        for watcher in watchers:
            watcher.start()
        pause = threading.Event()
        while any(watcher.is_alive() for watcher in watchers) and not deadline.expired():
            now = time.perf_counter() - started
            samples.append((now, {n: w.position for n, w in runner.workers.items()}))
            pause.wait(SAMPLE_S)
        for watcher in watchers:
            watcher.join(deadline.remaining() + 1.0)
        done = _throughput(end, started, cpu)
    finally:
        runner.stop()
    finished = len(reached) == len(runner.workers)
    seconds = max(reached.values()) if finished else done.seconds
    samples.extend((at, {name: end}) for name, at in reached.items())
    return CatchUp(
        events=end,
        seconds=seconds,
        events_per_s=round(end / seconds, 1),
        cpu_per_wall=done.cpu_per_wall,
        finished=finished,
        per_projection_s=reached,
        first_fifth_events_per_s=_fifth_rates(samples, reached, end, last=False),
        last_fifth_events_per_s=_fifth_rates(samples, reached, end, last=True),
    )


def catch_up_alone(
    projector: Projector, log: EventLog, end: int, admin_url: str, deadline: Deadline
) -> CatchUp:
    """One projection alone, from the same log into a database of its own (no other
    projection shares the process's GIL or the tables' database)."""
    with postgres_database(admin_url) as url:
        return catch_up(
            ProjectionRunner(Settings(database_url=url), log, [projector]), end, deadline
        )


def _fifth_rates(
    samples: list[tuple[float, dict[str, int]]], reached: dict[str, float], end: int, *, last: bool
) -> dict[str, float]:
    """Events/s of each finished projection between the samples bracketing 0-20 % (or
    80-100 %) of the log."""
    rates: dict[str, float] = {}
    low, high = (0.8 * end, end) if last else (0, 0.2 * end)
    for name in reached:
        track = sorted((t, at[name]) for t, at in samples if name in at)
        before = [sample for sample in track if sample[1] <= low]
        after = [sample for sample in track if sample[1] >= high]
        if before and after and after[0][0] > before[-1][0]:
            (t0, n0), (t1, n1) = before[-1], after[0]
            rates[name] = round((n1 - n0) / (t1 - t0), 1)
    return rates


def visibility(log: EventLog, database_url: str, commands: int, deadline: Deadline) -> Latency:
    """Create-scenario commands one at a time against `accubooks api`, with `accubooks
    project` following the log: for each, the time from its 201 to the first 200 of
    GET /api/scenarios/{id} (polled back to back, bounded)."""
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    tenant_id = tenants.create_tenant(deps, "Latency").tenant_id
    key = tenants.issue_key(deps, tenant_id, "writer").key
    acks: list[float] = []
    visible: list[float] = []
    reads: list[float] = []
    first_read = not_visible = failed = 0
    with ExitStack() as stack:
        stack.enter_context(accubooks(["project"], database_url)).first_line(deadline)
        # One after the other: two processes opening the PostgreSQL store in the same
        # instant can fail at startup ("tuple concurrently updated", see the xfail tests in
        # tests/projections/test_projection_processes.py).
        api = stack.enter_context(
            accubooks(["api", "--host", "127.0.0.1", "--port", "0"], database_url)
        )
        url = str(api.first_line(deadline)["url"])
        with httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=REQUEST_TIMEOUT_S,
            trust_env=False,
        ) as client:
            client.get("/health/live").raise_for_status()
            for _ in range(commands):
                if deadline.expired():
                    break
                sent = time.perf_counter()
                created = client.post(
                    "/api/scenarios",
                    content=SCENARIO_BODY,
                    headers={
                        "Idempotency-Key": uuid.uuid4().hex,
                        "Content-Type": "application/json",
                    },
                )
                acked = time.perf_counter()
                if created.status_code != 201:
                    failed += 1
                    continue
                acks.append(acked - sent)
                path = f"/api/scenarios/{created.json()['id']}"
                polls = 0
                while True:
                    asked = time.perf_counter()
                    status = client.get(path).status_code
                    answered = time.perf_counter()
                    polls += 1
                    if status == 200:
                        visible.append(answered - acked)
                        reads.append(answered - asked)
                        first_read += polls == 1
                        break
                    if status != 404:
                        failed += 1
                        break
                    if answered - acked > VISIBILITY_TIMEOUT_S or deadline.expired():
                        not_visible += 1
                        break
    ordered = sorted(visible)
    return Latency(
        commands=commands,
        visible=len(visible),
        not_visible=not_visible,
        failed=failed,
        ack_p50_ms=_percentile_ms(sorted(acks), 50),
        visible_p50_ms=_percentile_ms(ordered, 50),
        visible_p95_ms=_percentile_ms(ordered, 95),
        visible_p99_ms=_percentile_ms(ordered, 99),
        visible_max_ms=round(ordered[-1] * 1000, 2) if ordered else float("nan"),
        read_p50_ms=_percentile_ms(sorted(reads), 50),
        visible_on_first_read=first_read,
    )


def _percentile_ms(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted seconds, in milliseconds."""
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered)))
    return round(ordered[min(rank, len(ordered)) - 1] * 1000, 2)


# --- the report ---------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render_markdown(report: Report) -> str:
    m, base, cu = report.machine, report.baseline, report.catch_up
    lines = [
        "# Projections benchmark: catch-up and command-to-read latency on PostgreSQL",
        "",
        f"`{report.command}` — {'ok' if report.ok else '**FAILED** (see below)'}",
        "",
        "| phase | events | s | events/s | CPU s per wall s |",
        "|---|--:|--:|--:|--:|",
        f"| bulk write ({SAVE_AGGREGATES} aggregates per save) | {report.bulk_write.events:,}"
        f" | {report.bulk_write.seconds:.2f} | {report.bulk_write.events_per_s:,.0f}"
        f" | {report.bulk_write.cpu_per_wall:.2f} |",
        f"| baseline: read + decode, pages of {PAGE} | {base.events:,} | {base.seconds:.2f}"
        f" | {base.events_per_s:,.0f} | {base.cpu_per_wall:.2f} |",
        f"| catch-up: 4 projections, one process | {cu.events:,} | {cu.seconds:.2f}"
        f" | {cu.events_per_s:,.0f} | {cu.cpu_per_wall:.2f} |",
        "",
        "| projection, all four together | reached the end after s | its rate, events/s |",
        "|---|--:|--:|",
    ]
    for name, seconds in sorted(cu.per_projection_s.items(), key=lambda item: item[1]):
        lines.append(f"| {name} | {seconds:.2f} | {cu.events / seconds:,.0f} |")
    if report.solo:
        lines += [
            "",
            "| projection alone | s | events/s | over the first fifth of the log"
            " | over the last fifth | last / first |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for name, alone in report.solo.items():
            first = alone.first_fifth_events_per_s.get(name)
            last = alone.last_fifth_events_per_s.get(name)
            ratio = "-" if not first or last is None else f"{last / first:.2f}"
            lines.append(
                f"| {name} | {alone.seconds:.2f} | {alone.events_per_s:,.0f}"
                f" | {_fmt(first)} | {_fmt(last)} | {ratio} |"
            )
    lines += [
        "",
        "| ratio | value |",
        "|---|--:|",
        f"| catch-up / baseline | {report.catch_up_over_baseline:.3f} |",
        f"| read + decode share of the catch-up (4 x catch-up / baseline) |"
        f" {report.read_decode_share:.2f} |",
        "",
        "Catch-up events/s counts each event once although four projections apply it; the"
        " baseline pages and decodes the log once with no projection work, so catch-up /"
        " baseline near 0.25 would mean the projections cost nothing beyond each reading the"
        " log. Together, the four share one process (one GIL) and the machine; alone, each"
        " projection runs by itself into an empty database, and a last-fifth rate well below"
        " the first-fifth rate means its work per event grows with its tables.",
    ]
    lat = report.latency
    if lat is not None:
        lines += [
            "",
            f"Command to visibility: {lat.commands} POST /api/scenarios one at a time against"
            " `accubooks api`, `accubooks project` following the log; time from the 201 to the"
            " first 200 of GET /api/scenarios/{id}, polled back to back.",
            "",
            "| visible | not visible | failed | ack p50 ms | visible p50 ms | p95 ms | p99 ms"
            " | max ms | read p50 ms | visible on first read |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            f"| {lat.visible} | {lat.not_visible} | {lat.failed} | {lat.ack_p50_ms:.1f}"
            f" | {lat.visible_p50_ms:.1f} | {lat.visible_p95_ms:.1f} | {lat.visible_p99_ms:.1f}"
            f" | {lat.visible_max_ms:.1f} | {lat.read_p50_ms:.1f} | {lat.visible_on_first_read} |",
            "",
            "A read's round trip (read p50) is the resolution of the visibility figures: a"
            " command visible on the first read shows roughly that figure.",
        ]
    lines += [
        "",
        f"Machine: nproc {m.nproc}, load average (1 min) {m.loadavg_1m_at_start} at start and"
        f" {m.loadavg_1m_at_end} at end, Python {m.python}, PostgreSQL {m.postgres};"
        f" {m.date}; git HEAD {m.git_head}. The benchmark, the API and the projection"
        " processes and PostgreSQL share the machine's cores.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.projection_bench", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--commands", type=int, default=300)
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument(
        "--no-solo",
        dest="solo",
        action="store_false",
        help="skip the catch-up of each projection alone",
    )
    parser.add_argument(
        "--lag",
        action="store_true",
        help="then measure the projection lag under the read mix (perf.lag_bench) into the"
        " same report",
    )
    args = parser.parse_args(argv)
    report = run(
        events=args.events,
        commands=args.commands,
        budget_s=args.budget_s,
        admin_url=args.admin_url,
        each_alone=args.solo,
        command=" ".join([".venv/bin/python -m perf.projection_bench", *(argv or sys.argv[1:])]),
    )
    markdown = render_markdown(report)
    write_report("projections", markdown, report)
    print(markdown)
    print(msgspec.json.format(msgspec.json.encode(report)).decode())
    ok = report.ok
    if args.lag:
        lag = lag_bench.run(commands=args.commands)
        text = lag_bench.markdown(lag)
        lag_bench.merge_into_projections_report(text, lag)
        print(text)
        ok = ok and lag.ok
    return 0 if ok else 1


def run(
    *,
    events: int = 100_000,
    commands: int = 300,
    budget_s: float = 900.0,
    admin_url: str = ADMIN_URL,
    each_alone: bool = True,
    command: str = ".venv/bin/python -m perf.projection_bench",
) -> Report:
    """The catch-up and latency benchmark; its report (not written)."""
    deadline = Deadline(time.monotonic() + budget_s)
    load_at_start = round(os.getloadavg()[0], 2)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database(admin_url))
        settings = Settings(database_url=url)
        log = open_event_log(settings)
        stack.callback(log.close)
        bulk = write_bulk(log, events, deadline)
        end = log.position()
        # Twice: the first run also warms PostgreSQL's cache for the catch-up after it.
        baseline = max(
            (read_and_decode(log, end, deadline) for _ in range(2)), key=lambda t: t.events_per_s
        )
        caught_up = catch_up(wiring.projection_runner(settings, log), end, deadline)
        solo = (
            {
                projector.name: catch_up_alone(projector, log, end, admin_url, deadline)
                for projector in wiring.projectors()
            }
            if each_alone
            else {}
        )
        latency = (
            visibility(log, url, commands, deadline)
            if caught_up.finished and commands > 0
            else None
        )
    ok = (
        baseline.events == end
        and caught_up.finished
        and all(alone.finished for alone in solo.values())
        and latency is not None
        and latency.visible == commands
    )
    return Report(
        ok=ok,
        command=command,
        machine=Machine(
            nproc=len(os.sched_getaffinity(0)),
            loadavg_1m_at_start=load_at_start,
            loadavg_1m_at_end=round(os.getloadavg()[0], 2),
            python=platform.python_version(),
            postgres=postgres_version(admin_url),
            date=date,
            git_head=git_head(),
        ),
        bulk_write=bulk,
        baseline=baseline,
        catch_up=caught_up,
        solo=solo,
        catch_up_over_baseline=round(caught_up.events_per_s / baseline.events_per_s, 3),
        read_decode_share=round(4 * caught_up.events_per_s / baseline.events_per_s, 2),
        latency=latency,
    )


if __name__ == "__main__":
    sys.exit(main())
