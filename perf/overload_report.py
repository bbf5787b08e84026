"""The overload benchmark's report (perf/overload_bench.py): its figures by phase, issue
8's targets checked against them, and the Markdown."""

from __future__ import annotations

import msgspec

from perf.openloop import OpenLoopResult, RouteLatency
from perf.read_report import Cores, Machine

P99_TARGET_MS = 50.0
GOODPUT_TARGET = 0.90  # of capacity
SHED_CODE = "503 OVERLOADED"  # perf.openloop's error_codes key for a shed answer


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """The closed-loop run: capacity is its 2xx answers per second."""

    wrk_command: str
    seconds: float
    requests: int
    non_2xx: int
    socket_errors: int
    capacity_per_s: float
    # The API process's CPU per answered request (its CPU seconds / requests).
    server_cpu_per_request_us: float | None
    p50_ms: float
    p99_ms: float
    cores: Cores


class Overload(msgspec.Struct, frozen=True, kw_only=True):
    """The open-loop run at ``factor`` x capacity, and its figures."""

    factor: float
    offered_per_s: float
    goodput_per_s: float  # 2xx answers of the requests scheduled, per scheduled second
    goodput_ratio: float  # goodput / capacity
    shed_503: int  # answers 503 OVERLOADED (the envelope's code read from each body)
    shed_server_side: int  # the API's own accubooks_shed_requests_total, for comparison
    other_non_2xx: dict[str, int]  # "<status> <code>" of the non-2xx answers that are not
    failed: int  # timeouts and connection errors
    failures: dict[str, int]  # the same by exception
    # The API process's CPU per shed request: what its CPU did not spend on the admitted
    # requests (at the capacity phase's cost each), over the shed ones.
    server_cpu_per_shed_us: float | None
    # The goodput ratio a fully busy server allows at that cost: g = (1 - f*C*s) / (1 - C*s)
    # for offered f x capacity C and shed cost s, as admitted + shed must fit in one core.
    goodput_bound: float | None
    admitted: RouteLatency  # the 2xx answers
    shed_latency: RouteLatency | None
    generator_cores: float
    cores: Cores
    open_loop: OpenLoopResult


class Recovery(msgspec.Struct, frozen=True, kw_only=True):
    """The open-loop run at ``factor`` x capacity right after the overload."""

    factor: float
    offered_per_s: float
    # From the overload's last scheduled request to the first one of this run (the
    # overload's last answers are awaited in between).
    started_after_s: float
    first_second_p99_ms: float | None
    all_2xx: bool
    generator_cores: float
    cores: Cores
    open_loop: OpenLoopResult


class Check(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    target: str
    measured: str
    met: bool


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: Machine
    workload: str
    tenants: int
    scenarios: int  # per tenant
    events: int
    api_env: dict[str, str]
    capacity: Capacity | None
    overload: Overload | None
    recovery: Recovery | None
    checks: list[Check]
    problems: list[str]


def checks(
    capacity: Capacity | None, overload: Overload | None, recovery: Recovery | None
) -> list[Check]:
    """Issue 8's targets, each with its measured figure (none for a phase not measured)."""
    checks: list[Check] = []
    if capacity is None or overload is None:
        return checks
    checks += [
        Check(
            name="admitted p99",
            target=f"<= {P99_TARGET_MS:g} ms",
            measured=f"{overload.admitted.p99_ms:g} ms",
            met=overload.admitted.requests > 0 and overload.admitted.p99_ms <= P99_TARGET_MS,
        ),
        Check(
            name="goodput",
            target=f">= {GOODPUT_TARGET:.0%} of capacity",
            measured=f"{overload.goodput_per_s:,.0f} req/s = {overload.goodput_ratio:.1%} of "
            f"{capacity.capacity_per_s:,.0f}",
            met=overload.goodput_ratio >= GOODPUT_TARGET,
        ),
        Check(
            name="the rest answered 503 OVERLOADED",
            target="every non-2xx is 503 OVERLOADED; 0 other 5xx, 0 timeouts",
            measured=f"{overload.shed_503:,} x 503 OVERLOADED, other {overload.other_non_2xx}, "
            f"{overload.failed} timeouts or connection errors",
            met=not overload.other_non_2xx and overload.failed == 0,
        ),
    ]
    if recovery is not None:
        first = recovery.first_second_p99_ms
        checks.append(
            Check(
                name="recovers at once",
                target=f"first second at {recovery.factor:g}x capacity: p99 <= "
                f"{P99_TARGET_MS:g} ms; every answer 2xx",
                measured=f"p99 {first} ms in the first second; "
                f"{'all 2xx' if recovery.all_2xx else 'NOT all 2xx'}",
                met=first is not None and first <= P99_TARGET_MS and recovery.all_2xx,
            )
        )
    return checks


def _ms(latency: RouteLatency | None) -> str:
    if latency is None:
        return "- | - | - | -"
    return (
        f"{latency.p50_ms:.1f} | {latency.p95_ms:.1f} | {latency.p99_ms:.1f} | {latency.max_ms:.1f}"
    )


def _cores(cores: Cores, generator: float) -> str:
    edge = "" if cores.edge is None else f", edge {cores.edge}"
    return (
        f"server {cores.server} cores{edge}, PostgreSQL {cores.postgres}, generator "
        f"{generator} (machine {cores.machine} of 2)"
    )


def _capacity_cost(report: Report) -> str:
    return str(None if report.capacity is None else report.capacity.server_cpu_per_request_us)


def _shedding_cost(report: Report, o: Overload) -> str:
    if o.shed_server_side == 0 and o.cores.edge is not None:
        return (
            f"Cost of shedding: none to the API, which shed nothing: the edge answered every "
            f"503, using {o.cores.edge} cores in all."
        )
    return (
        f"Cost of shedding: {o.server_cpu_per_shed_us} us of the API's CPU per shed "
        f"request, against {_capacity_cost(report)} us per served one. With "
        f"admitted and shed requests sharing one busy core, that cost bounds the goodput "
        f"at {o.factor:g}x to {_ratio(o.goodput_bound)} of capacity: (1 - f*C*s) / "
        "(1 - C*s) for capacity C req/s and s CPU seconds per shed request."
    )


def _ratio(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.0%}"


def render_markdown(report: Report) -> str:
    m = report.machine
    lines = [
        "# Overload at 3x capacity (issue 8)",
        "",
        f"`{report.command}`: {'all targets met' if report.ok else 'NOT all targets met'}.",
        "",
        f"Workload: {report.workload}. API settings passed: "
        + ", ".join(f"`{k}={v}`" for k, v in report.api_env.items())
        + f" (the rest the service's defaults). Data: {report.tenants} tenants x "
        f"{report.scenarios} scenarios ({report.events:,} events), the read mix of "
        "perf/read_mix.py.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *[
            f"| {c.name}: {c.target} | {c.measured} | {'met' if c.met else '**missed**'} |"
            for c in report.checks
        ],
    ]
    if (c := report.capacity) is not None:
        lines += [
            "",
            "## Capacity (closed loop)",
            "",
            f"`{c.wrk_command}`: {c.capacity_per_s:,.0f} 2xx req/s over {c.seconds:g} s "
            f"(p50 {c.p50_ms:g} ms, p99 {c.p99_ms:g} ms; {c.non_2xx} non-2xx, "
            f"{c.socket_errors} socket errors); {_cores(c.cores, c.cores.wrk)} (wrk); "
            f"the API's CPU per request {c.server_cpu_per_request_us} us.",
        ]
    if (o := report.overload) is not None:
        loop = o.open_loop
        lines += [
            "",
            f"## Overload: open loop at {o.factor:g}x capacity for {loop.duration_s:g} s",
            "",
            f"Offered {o.offered_per_s:,.0f} req/s ({loop.scheduled:,} requests), goodput "
            f"{o.goodput_per_s:,.0f} 2xx/s = {o.goodput_ratio:.1%} of capacity; "
            f"{o.shed_503:,} answered 503 OVERLOADED (the API counted {o.shed_server_side:,} "
            f"shed), other non-2xx {o.other_non_2xx or 'none'}, {o.failed} timeouts or "
            f"connection errors {o.failures or ''}; {loop.connections_opened} connections "
            f"opened, send lag p99 {loop.send_lag_p99_ms:g} ms.",
            "",
            "| answers | count | p50 ms | p95 ms | p99 ms | max ms |",
            "|---|--:|--:|--:|--:|--:|",
            f"| admitted (2xx) | {o.admitted.requests:,} | {_ms(o.admitted)} |",
            f"| shed (503) | {o.shed_503:,} | {_ms(o.shed_latency)} |",
            "",
            f"CPU: {_cores(o.cores, o.generator_cores)}. Latency is measured from each "
            "request's scheduled send time (no coordinated omission).",
            "",
            _shedding_cost(report, o),
        ]
    if (r := report.recovery) is not None:
        lines += [
            "",
            f"## Recovery: open loop at {r.factor:g}x capacity ({r.offered_per_s:,.0f} req/s)",
            "",
            f"Started at most {r.started_after_s:g} s after the overload's last scheduled request; "
            f"{'every answer 2xx' if r.all_2xx else 'NOT every answer 2xx'}; "
            f"{_cores(r.cores, r.generator_cores)}.",
            "",
            "| second | 2xx | non-2xx | failed | p99 ms | max ms |",
            "|--:|--:|--:|--:|--:|--:|",
            *[
                f"| {s.second} | {s.ok_2xx} | {s.non_2xx} | {s.failed} | {s.p99_2xx_ms:g} | "
                f"{s.max_2xx_ms:g} |"
                for s in r.open_loop.per_second[:5]
            ],
        ]
    if report.problems:
        lines += ["", "## Problems", "", *[f"- {p}" for p in report.problems]]
    lines += [
        "",
        f"Machine: {m.nproc} cores ({m.cpu}), load average {m.loadavg_1m_at_start} at start, "
        f"{m.loadavg_1m_at_end} at end; PostgreSQL {m.postgres}, {m.wrk}, uvicorn "
        f"{m.uvicorn} ({m.uvicorn_loop_http}); {m.date}; git HEAD {m.git_head}. The machine is "
        "shared: the cores used by other work during each phase are in the JSON (cores.other).",
    ]
    return "\n".join(lines) + "\n"
