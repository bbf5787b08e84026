"""The scale report (perf/reports/scale.md and .json): its shape, the latency summary of a
route and its markdown."""

from __future__ import annotations

import statistics
from typing import Any

import msgspec

from perf.scale_plans import RoutePlan

TARGET_RATIO = 1.2


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    p50_ms: float
    p95_ms: float
    mean_ms: float


class RouteResult(msgspec.Struct, frozen=True, kw_only=True):
    route: str
    path_large: str
    path_small: str
    large: Latency
    small: Latency
    p50_ratio: float
    # The median over rounds of large/small for the two reads of one round (taken one
    # after the other): noise that hits a whole round cancels out.
    paired_ratio: float
    # Held to the target (page-number pages are not: their cost is the offset's).
    target: bool
    ok: bool


class Seeding(msgspec.Struct, frozen=True, kw_only=True):
    large_scenarios: int
    small_scenarios: int
    # Per scenario: created, renamed, two forecasts requested, every tenth archived.
    events: int
    write_s: float
    catch_up_s: float


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: dict[str, Any]
    seeding: Seeding
    rounds: int
    warmup_rounds: int
    api_env: dict[str, str]
    routes: list[RouteResult]
    plans: list[RoutePlan]
    problems: list[str]


def latency(seconds: list[float]) -> Latency:
    ms = sorted(s * 1000 for s in seconds)
    return Latency(
        requests=len(ms),
        p50_ms=round(statistics.median(ms), 3),
        p95_ms=round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 3),
        mean_ms=round(statistics.fmean(ms), 3),
    )


def render_markdown(report: Report) -> str:
    s = report.seeding
    lines = [
        "# Reads against tenant size: 100,000 scenarios versus 10 (PostgreSQL, cache off)",
        "",
        f"`{report.command}` — {'ok' if report.ok else 'NOT OK'}",
        "",
        f"Log: a tenant with {s.large_scenarios:,} scenarios and one with {s.small_scenarios:,}"
        " (per scenario: created, renamed, two forecasts requested, every tenth archived),"
        f" {s.events:,} events written in {s.write_s} s through the event log;"
        f" `accubooks project` caught up in {s.catch_up_s} s; then VACUUM ANALYZE (what"
        " autovacuum does on its own after a bulk load).",
        "",
        f"Latency: one client, keep-alive, {report.rounds} measured rounds after"
        f" {report.warmup_rounds} warm-up rounds; each round reads every route for both"
        " tenants in turn, the order swapped every other round. Client-side wall time per"
        f" request against one `accubooks api` ({_env(report.api_env)}). Target: large/small"
        f" p50 <= {TARGET_RATIO} on every route but page-number pages. The paired ratio is"
        " the median over rounds of large/small for a round's two reads of the route (read"
        " one after the other), which noise hitting a whole round does not move.",
        "",
        "| route | large tenant | p50 ms | p95 ms | small p50 ms | small p95 ms | p50 ratio |"
        " paired ratio | target |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report.routes:
        verdict = ("ok" if r.ok else "MISSED") if r.target else "not held (O(offset))"
        lines.append(
            f"| {r.route} | `{r.path_large}` | {r.large.p50_ms:.2f} | {r.large.p95_ms:.2f} |"
            f" {r.small.p50_ms:.2f} | {r.small.p95_ms:.2f} | {r.p50_ratio:.3f} |"
            f" {r.paired_ratio:.3f} | {verdict} |"
        )
    lines += [
        "",
        "Plans of the large tenant's statements (EXPLAIN (ANALYZE, BUFFERS)): rows read from"
        " the tenant's table (returned by its scans plus removed by their filters) against the"
        " rows the page needs (limit + 1; plus the offset for a page-number page); the custom"
        " plan is the one planned for the given values, the generic one what a statement that"
        " psycopg prepared (after 5 runs on a connection) may settle on.",
        "",
        "| route | needed | custom: rows read | sorted | buffers | ms | generic: rows read |"
        " sorted | buffers | ms | scans |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for p in report.plans:
        c, g = p.custom, p.generic
        lines.append(
            f"| {p.route} | {p.rows_needed:,} | {c.rows_read:,} | {c.rows_sorted:,} |"
            f" {c.buffers:,} | {c.execution_ms:.3f} | {g.rows_read:,} | {g.rows_sorted:,} |"
            f" {g.buffers:,} | {g.execution_ms:.3f} | {', '.join(c.indexes) or '-'} |"
        )
    if report.problems:
        lines += ["", "Problems:", "", *(f"- {p}" for p in report.problems)]
    lines += ["", f"Machine: {msgspec.json.encode(report.machine).decode()}.", ""]
    for p in report.plans:
        lines += [
            f"## {p.route}",
            "",
            "```sql",
            p.sql,
            "```",
            "",
            "Custom plan:",
            "",
            "```",
            p.custom.text,
            "```",
            "",
            "Generic plan:",
            "",
            "```",
            p.generic.text,
            "```",
            "",
        ]
    return "\n".join(lines)


def _env(env: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items())
