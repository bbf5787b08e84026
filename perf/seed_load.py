"""The seed's load test, reproduced: 100 concurrent users and 10,000 requests (as the
seed's ab run) against the production topology (perf.topology), with locust, headless and
bounded. The seed's read endpoints in the read mix's proportions, a share of commands
with fresh Idempotency-Keys, and replays of earlier commands that must return the stored
answer byte for byte. Thresholds set the exit code: by default the seed's figures beaten
by an order of magnitude (>= 4,500 req/s, p95 <= 58 ms, p99 <= 120 ms), 0 failures and 0
replay mismatches.

    .venv/bin/python -m perf.seed_load

writes perf/reports/seed_load.md and .json. Its topology's defaults are the issue's data
(50 tenants, 20,000 scenarios, 60,000 forecasts, one tenant with 100,000 scenarios);
--small seeds a fraction of it for a quick try.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from perf.cpu import CpuMeter, cpu_s
from perf.harness import ADMIN_URL, ROOT, Deadline, git_head, write_report
from perf.processes import stop_on_signals
from perf.read_mix import MIX, draw_plan
from perf.seeding import ARCHIVED_EVERY
from perf.topology import Seeded, Shape, Topology, production

# The seed's own figures (its ab run and its endpoint table), the baseline we beat.
SEED_REQ_PER_S = 450.0
SEED_P95_MS = 580.0
SEED_P99_MS = 1200.0
SEED_ENDPOINT_P95_MS = {"scenario list": 120.0, "scenario detail": 180.0, "dashboard": 350.0}
PLAN_LINES = 20_000
LOCUST_MAX_S = 300


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    seed_p95_ms: float | None


class Thresholds(msgspec.Struct, frozen=True, kw_only=True):
    min_req_per_s: float = SEED_REQ_PER_S * 10
    max_p95_ms: float = SEED_P95_MS / 10
    max_p99_ms: float = SEED_P99_MS / 10


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    users: int
    requests: int
    failures: int
    req_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    commands: int
    replays: int
    replay_mismatches: int
    forecasts_requested: int
    seed_ratio_req_per_s: float
    seed_ratio_p95: float
    seed_ratio_p99: float
    thresholds: Thresholds
    endpoints: list[Endpoint]
    cpu_cores: dict[str, float | None]
    api_rss_mb: list[float]
    seeded: Seeded
    api_processes: int
    machine: dict[str, str | int | float]
    problems: list[str]


def rss_mb(pid: int) -> float:
    """The resident set of a process now, in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """The peak resident set of a running process (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def write_plan(top: Topology, path: Path, out: Path, limit: int, rng: random.Random) -> None:
    reads = draw_plan(top.tenants, PLAN_LINES, rng)
    plan = {
        "apiUrls": top.api_urls,
        "reads": [[line.route, line.path, line.key] for line in reads],
        "writers": [
            {
                # Not the archived ones: a forecast of an archived scenario is refused.
                "key": key,
                "scenarioIds": [
                    sid
                    for i, sid in enumerate(tenant.scenario_ids[:60])
                    if i % ARCHIVED_EVERY != ARCHIVED_EVERY - 1
                ],
            }
            for tenant, key in zip(top.tenants, top.writers, strict=True)
        ],
        "limit": limit,
        "commandShare": 0.04,
        "replayShare": 0.02,
        "forecastShare": 0.002,
        "out": str(out),
    }
    path.write_bytes(msgspec.json.encode(plan))


def run_locust(
    top: Topology, users: int, limit: int, deadline: Deadline, rng: random.Random
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Locust headless against the topology: its final figures (written by the
    locustfile when it quits) and the CPU cores each process used meanwhile."""
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    with tempfile.TemporaryDirectory(prefix="seed_load_") as tmp:
        plan, out = Path(tmp, "plan.json"), Path(tmp, "counts.json")
        write_plan(top, plan, out, limit, rng)
        env = {**os.environ, "ACCUBOOKS_LOCUST_PLAN": str(plan)}
        command = [
            locust,
            "-f",
            str(ROOT / "perf" / "locustfile.py"),
            "--headless",
            "--host",
            top.api_urls[0],
            "--users",
            str(users),
            "--spawn-rate",
            str(users),
            "--run-time",
            f"{int(min(LOCUST_MAX_S, deadline.remaining()))}s",
            "--stop-timeout",
            "10",
            "--only-summary",
            "--loglevel",
            "WARNING",
        ]
        watched = {f"api {i}": pid for i, pid in enumerate(top.api_pids)}
        watched["project"] = top.project_pid
        with open(Path(tmp, "locust.log"), "wb") as log:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            meter = CpuMeter({**watched, "locust": proc.pid}, top.database_url)
            meter.start()
            locust_cpu = 0.0
            try:
                while proc.poll() is None:
                    if deadline.expired():
                        proc.terminate()
                    locust_cpu = cpu_s(proc.pid) or locust_cpu
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            used = meter.stop()
        said = Path(tmp, "locust.log").read_text()[-3000:]
        if not out.exists():
            raise SystemExit(f"locust wrote no results: {said}")
        results: dict[str, Any] = msgspec.json.decode(out.read_bytes())
        if not results["total"]["requests"]:
            raise SystemExit(f"locust made no request: {said}")
        cores: dict[str, float | None] = {
            name: (None if cpu is None else round(cpu / used.wall_s, 2))
            for name, cpu in used.processes.items()
        }
        cores["locust"] = cores.get("locust") or round(locust_cpu / used.wall_s, 2)
        cores["postgres"] = (
            None if used.postgres_s is None else round(used.postgres_s / used.wall_s, 2)
        )
        cores["machine"] = round(used.machine_s / used.wall_s, 2)
        return results, cores


def measure(
    top: Topology, *, users: int, limit: int, thresholds: Thresholds, deadline: Deadline
) -> tuple[Report, str]:
    rng = random.Random(7)
    load = round(os.getloadavg()[0], 2)
    results, cores = run_locust(top, users, limit, deadline, rng)
    counts: dict[str, int] = results["counts"]
    total: dict[str, Any] = results["total"]
    endpoints = sorted(
        (
            Endpoint(
                name=e["name"],
                requests=e["requests"],
                failures=e["failures"],
                p50_ms=round(e["p50"], 1),
                p95_ms=round(e["p95"], 1),
                p99_ms=round(e["p99"], 1),
                max_ms=round(e["max"], 1),
                seed_p95_ms=SEED_ENDPOINT_P95_MS.get(e["name"]),
            )
            for e in results["entries"]
        ),
        key=lambda e: e.name,
    )
    req_per_s = float(total["reqPerS"])
    p95, p99 = round(total["p95"], 1), round(total["p99"], 1)
    problems: list[str] = []
    failures = int(total["failures"])
    if failures:
        errors = "; ".join(
            f"{e['name']}: {e['error'][:160]} x{e['occurrences']}" for e in results["errors"]
        )
        problems.append(f"{failures} failed requests ({errors})")
    if counts.get("replayMismatches", 0):
        problems.append(f"{counts['replayMismatches']} replays differ from the stored answer")
    if not counts.get("replays"):
        problems.append("no replay was made: the idempotency check did not run")
    if req_per_s < thresholds.min_req_per_s:
        problems.append(f"{req_per_s:,.0f} req/s < {thresholds.min_req_per_s:,.0f}")
    if p95 > thresholds.max_p95_ms:
        problems.append(f"p95 {p95} ms > {thresholds.max_p95_ms} ms")
    if p99 > thresholds.max_p99_ms:
        problems.append(f"p99 {p99} ms > {thresholds.max_p99_ms} ms")
    if top.alive():
        problems.append(f"exited during the run: {top.alive()}")
    report = Report(
        ok=not problems,
        command=" ".join([".venv/bin/python -m perf.seed_load", *sys.argv[1:]]),
        users=users,
        requests=int(total["requests"]),
        failures=failures,
        req_per_s=round(req_per_s, 1),
        p50_ms=round(total["p50"], 1),
        p95_ms=p95,
        p99_ms=p99,
        commands=counts.get("commands", 0),
        replays=counts.get("replays", 0),
        replay_mismatches=counts.get("replayMismatches", 0),
        forecasts_requested=counts.get("forecasts", 0),
        seed_ratio_req_per_s=round(req_per_s / SEED_REQ_PER_S, 1),
        seed_ratio_p95=round(SEED_P95_MS / p95, 1) if p95 else 0.0,
        seed_ratio_p99=round(SEED_P99_MS / p99, 1) if p99 else 0.0,
        thresholds=thresholds,
        endpoints=endpoints,
        cpu_cores=cores,
        api_rss_mb=[peak_rss_mb(pid) for pid in top.api_pids],
        seeded=top.seeded,
        api_processes=len(top.api_urls),
        machine={
            "nproc": os.cpu_count() or 0,
            "load_average_start": load,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_head": git_head(),
        },
        problems=problems,
    )
    return report, render(report)


def render(r: Report) -> str:
    s = r.seeded
    lines = [
        "# The seed's load test, reproduced (locust, production topology)",
        "",
        f"`{r.command}` — {'ok' if r.ok else 'FAILED: ' + '; '.join(r.problems)}",
        "",
        "| figure | seed (ab) | ours | ours / seed |",
        "|---|--:|--:|--:|",
        f"| concurrent users | 100 | {r.users} | |",
        f"| requests | 10,000 | {r.requests:,} | |",
        f"| req/s | {SEED_REQ_PER_S:,.0f} | {r.req_per_s:,.0f} | {r.seed_ratio_req_per_s}x |",
        f"| p95 ms | {SEED_P95_MS:,.0f} | {r.p95_ms:g} | {r.seed_ratio_p95}x faster |",
        f"| p99 ms | {SEED_P99_MS:,.0f} | {r.p99_ms:g} | {r.seed_ratio_p99}x faster |",
        f"| failed requests | 0 | {r.failures} | |",
        "",
        f"Thresholds (exit code): >= {r.thresholds.min_req_per_s:,.0f} req/s, p95 <= "
        f"{r.thresholds.max_p95_ms:g} ms, p99 <= {r.thresholds.max_p99_ms:g} ms, 0 failures, "
        "0 replay mismatches.",
        "",
        "| endpoint | requests | failures | p50 ms | p95 ms | p99 ms | max ms | seed p95 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {e.name} | {e.requests:,} | {e.failures} | {e.p50_ms:g} | {e.p95_ms:g} | "
        f"{e.p99_ms:g} | {e.max_ms:g} | {'' if e.seed_p95_ms is None else f'{e.seed_p95_ms:g}'} |"
        for e in r.endpoints
    ]
    cores = ", ".join(f"{k} {v}" for k, v in r.cpu_cores.items())
    lines += [
        "",
        f"Commands: {r.commands:,} scenarios created with fresh Idempotency-Keys, {r.replays:,} "
        f"replays (same key, same command with its JSON keys reordered and other whitespace): "
        f"{r.replay_mismatches} answered anything but the stored status and body byte for byte "
        f"with `Idempotent-Replayed: true`; {r.forecasts_requested} forecasts requested (202).",
        "",
        f"CPU cores used during the run (CPU s per wall s; the machine has "
        f"{r.machine['nproc']}): {cores}. Peak RSS of the API processes: "
        f"{', '.join(f'{m:g} MB' for m in r.api_rss_mb)}.",
        "",
        f"Topology: {r.api_processes} `accubooks api` processes (locust users spread evenly "
        "over them), `accubooks project`, `accubooks worker`, PostgreSQL, a private Redis "
        "for the cache and another for the broker. Data seeded through the log: "
        f"{s.tenants} tenants, {s.scenarios:,} scenarios ({s.archived:,} archived), forecasts "
        f"{s.forecasts_completed:,} completed, {s.forecasts_failed:,} failed, "
        f"{s.forecasts_queued:,} queued, and one more tenant with "
        f"{s.large_tenant_scenarios:,} scenarios; {s.events:,} events written in "
        f"{s.write_s} s, projected from position 0 in {s.catch_up_s} s. The users read the "
        f"regular tenants (shares: {', '.join(f'{k} {v} %' for k, v in MIX.items())}), "
        "no think time, as the seed's ab run.",
        "",
        f"Machine: {r.machine}. Locust runs on the same 2 cores as everything else: its CPU "
        "is in the table above.",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.seed_load", description=__doc__)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="seed a tenth of the data")
    parser.add_argument("--min-req-per-s", type=float, default=Thresholds().min_req_per_s)
    parser.add_argument("--max-p95-ms", type=float, default=Thresholds().max_p95_ms)
    parser.add_argument("--max-p99-ms", type=float, default=Thresholds().max_p99_ms)
    parser.add_argument("--budget-s", type=float, default=1200.0)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop_on_signals()
    deadline = Deadline(time.monotonic() + args.budget_s)
    shape = Shape(api_processes=args.api_processes)
    if args.small:
        shape = Shape(
            tenants=10,
            scenarios=200,
            forecasts=3,
            large_tenant=10_000,
            api_processes=args.api_processes,
        )
    thresholds = Thresholds(
        min_req_per_s=args.min_req_per_s, max_p95_ms=args.max_p95_ms, max_p99_ms=args.max_p99_ms
    )
    with production(shape, deadline, admin_url=args.admin_url) as top:
        report, markdown = measure(
            top, users=args.users, limit=args.requests, thresholds=thresholds, deadline=deadline
        )
    write_report("seed_load", markdown, report)
    print(markdown)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
