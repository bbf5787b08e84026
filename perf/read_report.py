"""The read-path report (perf/reports/read_path.md and .json): its shape, the machine facts
it quotes and its markdown."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import msgspec

from perf.api_metrics import RouteTime
from perf.cpu import CpuUsed
from perf.harness import git_head
from perf.machine import cpu_model, postgres_version, tool_version, uvicorn_loop_http
from perf.openloop import OpenLoopResult
from perf.read_mix import PAGE_LIMIT, Sample
from perf.seeding import FORECAST_MONTHS, FORECAST_PATHS


class Seeding(msgspec.Struct, frozen=True, kw_only=True):
    tenants: int
    scenarios: int
    archived: int
    forecasts_completed: int
    forecasts_failed: int
    forecasts_queued: int
    events: int
    write_s: float
    catch_up_s: float
    catch_up_events_per_s: float


class Cores(msgspec.Struct, frozen=True, kw_only=True):
    """CPU seconds per wall second during the measured run, by process (None: not
    measured). ``machine`` is every process on the machine; ``other`` what is left of it
    once the processes of this run are counted (other people's work on a shared box)."""

    server: float | None
    postgres: float | None
    redis: float | None
    wrk: float
    machine: float
    other: float
    # The edge proxy in front of the server (deploy/haproxy.cfg), when a run has one.
    edge: float | None = None


def cores_of(used: CpuUsed) -> Cores:
    """Cores from the CPU seconds of a run: the server's and Redis's (named so in the meter),
    its PostgreSQL backends', wrk's (the reaped children) and the machine's."""
    wall = used.wall_s
    machine = used.machine_s / wall
    wrk = used.children_s / wall
    # The server's processes are named "server", "server 2", ... (its workers).
    servers = [v for k, v in used.processes.items() if k.startswith("server")]
    server_s = None if not servers or None in servers else sum(v for v in servers if v)
    redis_s = used.processes.get("redis")
    server = None if server_s is None else server_s / wall
    redis_cores = None if redis_s is None else redis_s / wall
    postgres = None if used.postgres_s is None else used.postgres_s / wall
    edge_s = used.processes.get("edge")
    edge = None if edge_s is None else edge_s / wall
    ours = sum(v for v in (server, postgres, redis_cores, wrk, edge) if v is not None)
    return Cores(
        server=_round(server),
        postgres=_round(postgres),
        redis=_round(redis_cores),
        wrk=round(wrk, 2),
        machine=round(machine, 2),
        other=round(max(0.0, machine - ours), 2),
        edge=_round(edge),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    server: str
    wrk_command: str
    seconds: float
    requests: int
    req_per_s: float
    ratio_to_hello: float | None
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non_2xx: int  # wrk counts answers with status >= 400
    socket_errors: int  # connect, read, write errors and timeouts
    bytes_per_request: float
    cores: Cores
    cache_hits: int | None = None
    # Answered from the API process's memory tier (no Redis round trip).
    cache_memory_hits: int | None = None
    cache_misses: int | None = None
    cache_errors: int | None = None
    shed: int | None = None
    routes: dict[str, RouteTime] = {}
    sample: Sample | None = None
    expect_degraded: bool | None = None
    # Peak resident memory under the load: the server's processes added up, and the
    # largest one of them.
    rss_peak_mb: float | None = None
    rss_peak_per_process_mb: float | None = None
    ok: bool = True
    problems: list[str] = []


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    cpu: str
    loadavg_1m_at_start: float
    loadavg_1m_at_end: float
    python: str
    postgres: str
    redis: str
    wrk: str
    uvicorn: str
    uvicorn_loop_http: str
    date: str
    git_head: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    machine: Machine
    seeding: Seeding
    mix: dict[str, int]
    connections: int
    threads: int
    duration_s: float
    warmup_s: float
    # The API process's environment (besides DATABASE_URL), for every accubooks phase.
    api_env: dict[str, str]
    hello_req_per_s: float
    phases: list[Phase]
    problems: list[str]
    # How the API and the hello were served (the same way), and its worker processes.
    serving: str = ""
    workers: int = 1
    # The open-loop phase (cache on, the same process as its closed-loop phase).
    open_loop: OpenLoopResult | None = None
    open_loop_rss_peak_mb: float | None = None


def machine_facts(admin_url: str, load_at_start: float, date: str) -> Machine:
    return Machine(
        nproc=len(os.sched_getaffinity(0)),
        cpu=cpu_model(),
        loadavg_1m_at_start=load_at_start,
        loadavg_1m_at_end=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        postgres=postgres_version(admin_url),
        redis=tool_version(["redis-server", "--version"]),
        wrk=tool_version(["wrk", "--version"]).split(" Copyright")[0],
        uvicorn=importlib.metadata.version("uvicorn"),
        uvicorn_loop_http=uvicorn_loop_http(),
        date=date,
        git_head=git_head(),
    )


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _per_request_us(cores: float | None, req_per_s: float) -> float | None:
    return None if cores is None or not req_per_s else cores / req_per_s * 1e6


def render_markdown(report: Report) -> str:
    m, s = report.machine, report.seeding
    lines = [
        "# Read path: the seed's read mix on PostgreSQL + Redis, cache on, off, Redis stopped",
        "",
        f"`{report.command}` — {'ok' if report.ok else '**FAILED** (see problems)'}",
        "",
        f"wrk, {report.connections} connections, {report.threads} threads,"
        f" {report.duration_s:g} s per phase after a {report.warmup_s:g} s warm-up;"
        f" `accubooks api --workers {report.workers}` ({report.serving}); the hello baseline"
        " is a bare Starlette JSON endpoint served the same way (the same serving code and"
        " worker count), measured before and after, the ratio taken to their mean"
        f" ({report.hello_req_per_s:,.0f} req/s).",
        "",
        "| phase | req/s | ratio to hello | p50 ms | p95 ms | p99 ms | max ms | non-2xx"
        " | socket errors | cache hit % (from memory %; lookups per request)"
        " | sampled: 200 / degraded |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.phases:
        memory = p.cache_memory_hits or 0
        looked = memory + (p.cache_hits or 0) + (p.cache_misses or 0) + (p.cache_errors or 0)
        hit = (
            "-"
            if p.cache_hits is None or not looked
            else f"{100 * (p.cache_hits + memory) / looked:.1f}"
            f" ({100 * memory / looked:.1f}; {looked / p.requests:.2f})"
        )
        sampled = "-" if p.sample is None else f"{p.sample.ok_200}/{p.sample.requests}"
        if p.sample is not None and p.expect_degraded is not None:
            sampled += f" / {p.sample.degraded}"
        lines.append(
            f"| {p.name} | {p.req_per_s:,.0f} | {_f(p.ratio_to_hello, 3)} | {p.p50_ms:.2f}"
            f" | {p.p95_ms:.2f} | {p.p99_ms:.2f} | {p.max_ms:.1f} | {p.non_2xx}"
            f" | {p.socket_errors} | {hit} | {sampled} |"
        )
    lines += [
        "",
        "Cache lookups are counted by the API (hit in memory, hit in Redis, miss, error);"
        " concurrent requests for"
        " one key share one lookup (single-flight), so there are fewer lookups than"
        " requests. The sample: the mix's requests fetched one by one with httpx2 right"
        " after the phase, the number answered 200 and the number marked"
        " `X-Service-Status: degraded` (expected on every answer with Redis stopped, on none"
        " otherwise).",
        "",
        "CPU cores used during each measured run (CPU s per wall s; the machine has"
        f" {m.nproc}): the server process (and its CPU per answered request), its"
        " PostgreSQL backends, Redis, wrk, the whole machine, and what is left of it for"
        " processes outside this run. A server near 1 core is one Python process's ceiling"
        " (one GIL): its CPU per request then sets its throughput.",
        "",
        "| phase | server | server CPU µs/request | PostgreSQL | Redis | wrk | machine | other"
        " | bytes/request | server RSS peak MB (largest process) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.phases:
        c = p.cores
        rss = (
            "-"
            if p.rss_peak_mb is None
            else f"{p.rss_peak_mb:.0f} ({_f(p.rss_peak_per_process_mb, 0)})"
        )
        lines.append(
            f"| {p.name} | {_f(c.server, 2)} | {_f(_per_request_us(c.server, p.req_per_s), 0)}"
            f" | {_f(c.postgres, 2)} | {_f(c.redis, 2)}"
            f" | {c.wrk:.2f} | {c.machine:.2f} | {c.other:.2f} | {p.bytes_per_request:,.0f}"
            f" | {rss} |"
        )
    if (o := report.open_loop) is not None:
        lines += [
            "",
            f"Open loop (perf/openloop.py), cache on, {o.rate_per_s:,.0f} req/s for"
            f" {o.duration_s:g} s, the mix's requests in a seeded random order, each latency"
            " from its scheduled send time (no coordinated omission): scheduled"
            f" {o.scheduled:,}, answered {o.completed:,} ({o.achieved_per_s:,.0f}/s), errors"
            f" {o.errors} (non-2xx {o.non_2xx}); the generator's own send lag p99"
            f" {o.send_lag_p99_ms:.2f} ms, max {o.send_lag_max_ms:.1f} ms, its CPU"
            f" {o.client_cores:.2f} cores; {o.connections_opened} connections; server RSS"
            f" peak {_f(report.open_loop_rss_peak_mb, 0)} MB.",
            "",
            "| endpoint | requests | errors | p50 ms | p95 ms | p99 ms | max ms |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for name, r in [("all", o.overall), *o.routes.items()]:
            lines.append(
                f"| {name} | {r.requests:,} | {r.errors} | {r.p50_ms:.2f} | {r.p95_ms:.2f}"
                f" | {r.p99_ms:.2f} | {r.max_ms:.1f} |"
            )
    api_phases = [p for p in report.phases if p.routes]
    if api_phases:
        lines += [
            "",
            "Server-side time per route (the API's own histogram, from the request reaching"
            " the app to its answer; wrk's figures add the socket and the event loop's"
            " queue): mean ms, and the bucket holding p95.",
            "",
            "| route | " + " | ".join(f"{p.name}: n, mean, p95 <=" for p in api_phases) + " |",
            "|---|" + "--:|" * len(api_phases),
        ]
        routes = sorted({r for p in api_phases for r in p.routes})
        for route in routes:
            cells = []
            for p in api_phases:
                t = p.routes.get(route)
                cells.append(
                    "-" if t is None else f"{t.requests:,}, {t.mean_ms:.2f}, {_f(t.p95_le_ms, 1)}"
                )
            lines.append(f"| {route} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The mix (share of requests): "
        + ", ".join(f"{name} {weight} %" for name, weight in report.mix.items())
        + f"; over all {s.tenants} tenants' reader keys, ids drawn uniformly; scenario list"
        f" pages 1-5 of {PAGE_LIMIT} (70 % page 1), forecast list page 1 or filtered by a"
        " scenario. The seed names these endpoints but gives no weights: the weights are"
        " ours.",
        "",
        f"Data, seeded through the log (tenant commands, then the aggregates as the commands"
        f" and the job worker save them): {s.tenants} tenants, {s.scenarios:,} scenarios"
        f" ({s.archived:,} archived), forecasts {s.forecasts_completed:,} completed"
        f" ({FORECAST_MONTHS} months x {FORECAST_PATHS} paths, the real model),"
        f" {s.forecasts_failed:,} failed, {s.forecasts_queued} queued; {s.events:,} events"
        f" written in {s.write_s:.1f} s; `accubooks project` caught up in {s.catch_up_s:.1f} s"
        f" ({s.catch_up_events_per_s:,.0f} events/s) and was stopped before the phases.",
        "",
        "The API process: "
        + ", ".join(f"`{k}={v}`" for k, v in report.api_env.items())
        + "; a fresh process per phase. The Redis-stopped one starts with Redis up, which is"
        " then killed (SIGKILL) under it; its warm-up covers the circuit breaker opening."
        " wrk's latency is closed-loop (a slow answer delays that"
        " connection's next request, so the tail is understated, not overstated); non-2xx"
        " counts answers with a status of 400 or more.",
    ]
    for p in report.phases:
        lines.append(f"- {p.name}: `{p.wrk_command}`")
    if report.problems:
        lines += ["", "Problems:", *(f"- {problem}" for problem in report.problems)]
    lines += [
        "",
        f"Machine: nproc {m.nproc} ({m.cpu}), load average (1 min) {m.loadavg_1m_at_start} at"
        f" start and {m.loadavg_1m_at_end} at end, Python {m.python}, PostgreSQL {m.postgres},"
        f" {m.redis}, {m.wrk}, uvicorn {m.uvicorn} ({m.uvicorn_loop_http}); {m.date};"
        f" git HEAD {m.git_head}. wrk, the server, PostgreSQL and Redis share the machine's"
        " cores.",
    ]
    return "\n".join(lines) + "\n"
