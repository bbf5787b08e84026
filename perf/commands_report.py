"""The report of perf.commands_bench: its shape (also written as JSON), what profiling
the write path showed, and the Markdown rendering."""

from __future__ import annotations

import msgspec

from perf.commands_checks import Idempotency

TARGET_COMMANDS_PER_S = 2000.0
TARGET_RATIO = 3.0


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    path: str  # "stock" or "group"
    clients: int
    round: int
    seconds: float
    completed: int
    commands_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    # CPU per completed command, by process kind (all API processes together; the
    # PostgreSQL backends of the benchmark database; wrk).
    api_cpu_us: float | None
    postgres_cpu_us: float | None
    loadgen_cpu_us: float
    # How busy the whole machine was (100 % = one core), other tenants included.
    machine_busy_pct: float


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """The median round of one path and client count."""

    path: str
    clients: int
    commands_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    api_cpu_us: float | None
    postgres_cpu_us: float | None


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    loadavg_1m_at_start: float
    python: str
    postgres: str
    wrk: str
    server: str
    date: str
    git_head: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: Machine
    api_processes: int
    rounds: int
    phase_seconds: float
    group_commit_max: int
    phases: list[Phase]
    summaries: list[Summary]
    group_over_stock_8: float
    group_over_stock_32: float
    meets_commands_per_s: bool
    meets_ratio: bool
    idempotency: Idempotency
    # py-spy of one group-commit API process during a 32-client phase (--profile).
    profile: list[str]


# What profiling the write path showed (py-spy on the API process, 2026-11-29) and what
# was done about it; the live profile of this run follows it in the report.
FINDINGS = """\
## What the profiles showed, and what changed

Stock path (one save per command; py-spy, wall and --gil, on the API process under 8 and
32 clients): the command spends its time in `EventLog.save` -> the library's
`insert_events`: `LOCK TABLE accubooks_events IN EXCLUSIVE MODE`, the insert, `NOTIFY` and
a commit that waits for its WAL flush, one command at a time (every other writer waits on
the lock; with one client a command still takes ~9 ms wall for ~3 ms of CPU: the flush).
Per command it also read the receipt before deciding (one more round trip and PG
statement). The API CPU per command (1.8-2.4 ms here; 5.4 ms in the first report, on a
busier machine) is spread over the HTTP stack on the event loop (middleware, access log,
socket writes: a bare GET /health/live costs ~0.5 ms), the hop to a worker thread and
back (anyio), psycopg, and per-command connection checkout; no single hotspot in our code.

Changes (infra/groupcommit.py, infra/eventstore.py, commands/idempotency.py,
commands/scenarios.py, commands/routes.py):
- Group commit: a committer thread saves every command queued while its previous
  transaction ran (<= ACCUBOOKS_GROUP_COMMIT_MAX, default 64) in one `Application.save`:
  one table lock, one NOTIFY, one WAL flush for the group; each command's receipt is in
  that same transaction. A refused group (version conflict, duplicate receipt) gives a
  conflict to exactly the members the log or an earlier member already took a slot from
  (read, not retried), commits the rest, and falls back to halving when the log shows
  nothing; a conflict only ever makes run() retry on fresh state, so every answer is the
  answer alone. Validation and refused decisions never reach the committer.
- No receipt read before the first try: a used key is caught by the receipt's
  deterministic id in the same save (or by the decision failing on the state its first run
  changed), and only then is the receipt read and replayed.
- POST /api/scenarios with group commit runs its first try on the event loop and awaits
  the committer (no worker thread, no anyio hop); every other case (conflicts, replays,
  updates that must read) goes through the unchanged threaded path.
- Not done: a msgspec mapper (MAPPER_TOPIC). The stored bytes must stay identical (audit
  hash chain, tools/verify_export.py), and JSONTranscoder's exact output (tagged
  UUID/Decimal/datetime, separators, escaping) would have to be reproduced byte for byte;
  the profile puts the transcoder at ~2 % of the API's GIL time, so the gain is small
  against that risk.

Where the rest goes (group path, live profile below): the event loop holds ~80-90 % of
the API's GIL time: the HTTP stack and middleware (service/), the access log line, the
socket writes (RequestResponseCycle.send ~8-18 %), and the domain's validation in
Scenario.create (~12 %); the committer thread (mapping events, psycopg) ~11-20 %.
PostgreSQL needs ~0.15-0.23 ms of CPU per command in groups (0.6-0.8 ms stock). At
~0.6-0.75 ms API + ~0.16 ms PG + ~0.04 ms wrk per command at 32 clients, two free cores
would allow roughly 2,200-2,500 commands/s; this machine was shared with other
benchmarks (machine busy ~200 %, load average at start above), so 2,000/s could not be
shown here. Cheaper per-command work left is outside the write path's files: the HTTP
middleware and access log (service/), and Scenario.create's re-validation (domain/).
"""


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(report: Report) -> str:
    m, i = report.machine, report.idempotency
    lines = [
        "# Commands benchmark: POST /api/scenarios on PostgreSQL, group commit vs stock path",
        "",
        f"`{report.command}` — {'ok' if report.ok else '**FAILED** (errors or idempotency)'}",
        "",
        f"{report.api_processes} API processes per path, {report.rounds} alternating rounds "
        f"of {report.phase_seconds:g} s per phase; group commit at most "
        f"{report.group_commit_max} commands per transaction. Stock: "
        "ACCUBOOKS_GROUP_COMMIT=false, one transaction (table lock + commit) per command.",
        "",
        "## Median of the rounds",
        "",
        "| path | clients | commands/s | p50 ms | p95 ms | p99 ms | API CPU µs/cmd "
        "| PG CPU µs/cmd |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in report.summaries:
        lines.append(
            f"| {s.path} | {s.clients} | {s.commands_per_s:,.0f} | {s.p50_ms:.1f} "
            f"| {s.p95_ms:.1f} | {s.p99_ms:.1f} | {_fmt(s.api_cpu_us)} "
            f"| {_fmt(s.postgres_cpu_us)} |"
        )
    lines += [
        "",
        "| ratio / target | value |",
        "|---|--:|",
        f"| group / stock, 8 clients | {report.group_over_stock_8:.2f} |",
        f"| group / stock, 32 clients (target >= {TARGET_RATIO:g}) "
        f"| {report.group_over_stock_32:.2f} |",
        f"| >= {TARGET_COMMANDS_PER_S:,.0f} commands/s at 32 clients "
        f"| {'yes' if report.meets_commands_per_s else 'no'} |",
        "",
        "## Every phase",
        "",
        "| path | clients | round | done | s | commands/s | p50 ms | p95 ms | p99 ms "
        "| non-2xx | socket errors | API CPU µs/cmd | PG CPU µs/cmd | wrk CPU µs/cmd "
        "| machine busy % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.phases:
        lines.append(
            f"| {p.path} | {p.clients} | {p.round} | {p.completed} | {p.seconds:.1f} "
            f"| {p.commands_per_s:,.0f} | {p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} "
            f"| {p.non_2xx} | {p.socket_errors} | {_fmt(p.api_cpu_us)} "
            f"| {_fmt(p.postgres_cpu_us)} | {_fmt(p.loadgen_cpu_us)} "
            f"| {p.machine_busy_pct:.0f} |"
        )
    lines += [
        "",
        "## Idempotency after the run " + ("(ok)" if i.ok else "(**FAILED**)"),
        "",
        f"- {i.acknowledged} commands acknowledged (2xx); {i.receipts} receipts and "
        f"{i.scenarios_created} scenarios in the log (at most {i.in_flight_bound} more than "
        "acknowledged may commit: requests in flight when wrk stopped waiting).",
        f"- Receipts whose answer names no scenario of its own: "
        f"{i.receipts_without_own_scenario}; scenarios no receipt names: "
        f"{i.scenarios_without_receipt} (exactly one set of events per key: both 0).",
        f"- Replays (same key and body, 32 at a time): {i.replays_identical} of "
        f"{i.replays_sent} answered the stored status and body byte for byte with "
        f"Idempotent-Replayed; events they added: {i.events_added_by_replays}.",
        f"- Reused keys with another body: {i.reused_keys_refused} of {i.reused_keys_sent} "
        "refused with 422 IDEMPOTENCY_KEY_REUSED.",
        "",
    ]
    lines += [FINDINGS]
    if report.profile:
        lines += [
            "## Profile: one group-commit API process, last 32-client phase (py-spy --gil)",
            "",
            "```",
            *report.profile,
            "```",
            "",
        ]
    lines += [
        f"Machine: nproc {m.nproc}, load average (1 min) at start {m.loadavg_1m_at_start}, "
        f"Python {m.python}, PostgreSQL {m.postgres}, {m.wrk}, {m.server}; {m.date}; "
        f"git HEAD {m.git_head}. wrk, PostgreSQL and the API processes share the machine's "
        "cores (and so does anything else running on it: see machine busy %).",
        "",
    ]
    return "\n".join(lines)
