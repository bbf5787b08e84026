"""The whole performance suite with one command, bounded in time, traffic on 127.0.0.1
only; writes perf/REPORT.md: the targets of issue 7 with the measured figure beside each,
the baseline each figure is quoted against (measured in the same run), machine facts, the
commands, and every benchmark's own report.

    .venv/bin/python -m perf.run_all            # everything, about 25-35 minutes here
    .venv/bin/python -m perf.run_all --quick    # smaller sizes, a few minutes: a smoke run
    .venv/bin/python -m perf.run_all --only model_bench,seed_load

Each benchmark runs as its own process (one at a time: they share the machine) with a
time limit; one that fails or times out is reported as such and the others still run.
Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and the Debian packages
redis-server and wrk. Exits 1 when a benchmark failed or a target was missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from perf.harness import REPORTS, ROOT, git_head


@dataclass(frozen=True)
class Step:
    """One benchmark: its module, arguments (full and quick), the reports it writes."""

    name: str
    args: list[str]
    quick_args: list[str]
    reports: list[str]
    limit_s: float
    what: str


STEPS = [
    Step(
        "model_bench",
        [],
        ["--runs", "3"],
        ["model"],
        300,
        "forecast compute: 120 months x 2,000 / 10,000 / 100,000 paths",
    ),
    Step(
        "read_bench",
        [],
        [
            *("--duration-s", "5", "--warmup-s", "2", "--tenants", "5", "--scenarios", "50"),
            *("--open-loop-s", "5"),
        ],
        ["read_path", "read_path_profile"],
        1200,
        "throughput ceiling (wrk, read mix, 100 connections) against the bare hello, "
        "open-loop latency at 1,000 req/s, API RSS",
    ),
    Step(
        "commands_bench",
        [],
        ["--seconds", "3", "--rounds", "1"],
        ["commands"],
        900,
        "write path: commands/s with idempotency on PostgreSQL, 8 and 32 clients, against "
        "the stock one-save-per-command path",
    ),
    Step(
        "lag_bench",
        ["--write"],
        ["--commands", "50", "--write"],
        ["lag"],
        900,
        "projection lag (command acknowledged -> visible) while the read mix runs",
    ),
    Step(
        "scale_bench",
        [],
        ["--large", "20000", "--rounds", "100"],
        ["scale"],
        1200,
        "reads of a 100,000-scenario tenant against a 10-scenario tenant",
    ),
    Step(
        "seed_load",
        [],
        ["--small", "--requests", "3000"],
        ["seed_load"],
        1500,
        "the seed's load test (locust, 100 users, 10,000 requests) on the production topology",
    ),
    Step(
        "overload_bench",
        ["--edge", "--report", "overload_edge"],
        ["--edge", "--report", "overload_edge", "--quick"],
        ["overload_edge"],
        300,
        "overload at 3x capacity (issue 8): one API process behind the edge "
        "(deploy/haproxy.cfg), cache off, open loop; admitted latency, goodput, "
        "503 OVERLOADED, recovery",
    ),
    Step(
        "rebuild_bench",
        ["--events", "1000000"],
        ["--events", "100000"],
        ["rebuild"],
        2400,
        "rebuild of every read model from position 0 over 1,000,000 events on PostgreSQL, "
        "worker peak RSS",
    ),
]


RUNS = REPORTS / "run_all.json"  # what the last run ran, for --report-only


class Ran(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    command: str
    exit_code: int | None  # None: stopped at its time limit
    seconds: float
    tail: str  # the end of its output when it failed


def run_step(step: Step, quick: bool, remaining_s: float) -> Ran:
    args = step.quick_args if quick else step.args
    command = [sys.executable, "-m", f"perf.{step.name}", *args]
    shown = " ".join([".venv/bin/python", "-m", f"perf.{step.name}", *args])
    print(f"== {shown}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    limit = max(1.0, min(step.limit_s, remaining_s))
    with open(REPORTS / f".{step.name}.log", "w+b") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            # SIGTERM unwinds the benchmark's `with` blocks, which stop what it started.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
        out.seek(0)
        tail = out.read().decode(errors="replace")[-2500:] if code != 0 else ""
    seconds = round(time.perf_counter() - started, 1)
    print(f"   exit {code} after {seconds} s", file=sys.stderr, flush=True)
    return Ran(name=step.name, command=shown, exit_code=code, seconds=seconds, tail=tail)


# --- reading the reports -----------------------------------------------------------------


def load(name: str) -> dict[str, Any] | None:
    path = REPORTS / f"{name}.json"
    if not path.exists():
        return None
    report: dict[str, Any] = msgspec.json.decode(path.read_bytes())
    return report


def dig(report: Any, path: str) -> Any:
    """report["a"]["b"][0]["c"] for "a.b.0.c"; None where anything is missing."""
    value = report
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit() and value:
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        else:
            return None
        if value is None:
            return None
    return value


def find(items: Any, **match: Any) -> dict[str, Any] | None:
    """The first dict in ``items`` whose fields equal ``match``."""
    for item in items or []:
        if isinstance(item, dict) and all(item.get(k) == v for k, v in match.items()):
            return item
    return None


def num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass(frozen=True)
class Target:
    measure: str
    target: str
    # The reports by name -> (the measured figure as text, met: True/False/None unknown)
    check: Callable[[dict[str, dict[str, Any] | None]], tuple[str, bool | None]]


def render(
    ran: list[Ran],
    reports: dict[str, dict[str, Any] | None],
    *,
    quick: bool,
    started: str,
    load_start: float,
    command: str,
) -> tuple[str, bool]:
    from perf.targets import TARGETS as targets

    rows: list[str] = []
    met_all = True
    for target in targets:
        try:
            figure, met = target.check(reports)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            figure, met = f"not measured ({type(e).__name__})", None
        met_all = met_all and bool(met)
        mark = {True: "met", False: "**missed**", None: "not measured"}[met]
        rows.append(f"| {target.measure} | {target.target} | {figure} | {mark} |")
    failed = [r for r in ran if r.exit_code != 0]
    lines = [
        "# Performance report (issue 7)",
        "",
        f"`{command}`: {'quick sizes (smoke run), not the issue sizes. ' if quick else ''}"
        f"{len(ran)} benchmarks, {len(failed)} failed or missed their own thresholds.",
        "",
        "Every figure is measured on this 2-core machine with the load generator, the API, "
        "the workers, PostgreSQL and Redis sharing its cores; each benchmark measures its "
        "baseline in the same run (bare hello, stock write path, read+decode of the log, "
        "random normals, the 10-scenario tenant) and quotes ratios, which survive a noisy "
        "machine better than absolute figures.",
        "",
        "## Targets",
        "",
        "| measure | target | measured | |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Runs",
        "",
        "| benchmark | command | exit | s |",
        "|---|---|--:|--:|",
        *[
            f"| {r.name} | `{r.command}` | "
            f"{'time limit' if r.exit_code is None else r.exit_code} | {r.seconds} |"
            for r in ran
        ],
        "",
        f"Machine: nproc {os.cpu_count()}, {platform.processor() or platform.machine()}, "
        f"load average (1 min) {load_start} at start and {round(os.getloadavg()[0], 2)} at "
        f"end, Python {platform.python_version()}; started {started}; git HEAD {git_head()}.",
    ]
    for r in failed:
        lines += ["", f"### {r.name}: exit {r.exit_code}", "", "```", r.tail.strip(), "```"]
    for step in STEPS:
        for name in step.reports:
            md = REPORTS / f"{name}.md"
            if not md.exists() or step.name not in {r.name for r in ran}:
                continue
            body = re.sub(r"^(#+) ", r"##\1 ", md.read_text(), flags=re.MULTILINE)
            lines += ["", f"## {step.what[0].upper()}{step.what[1:]}", "", body.strip()]
    return "\n".join(lines) + "\n", met_all and not failed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--budget-s", type=float, default=4800.0)
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite REPORT.md from the reports"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    wanted = {n for n in args.only.split(",") if n}
    unknown = wanted - {s.name for s in STEPS}
    if unknown:
        raise SystemExit(f"unknown benchmarks: {sorted(unknown)}")
    steps = [s for s in STEPS if not wanted or s.name in wanted]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = round(os.getloadavg()[0], 2)
    until = time.monotonic() + args.budget_s
    earlier = msgspec.json.decode(RUNS.read_bytes(), type=list[Ran]) if RUNS.exists() else []
    ran: list[Ran] = []
    if not args.report_only:
        REPORTS.mkdir(parents=True, exist_ok=True)
        for step in steps:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            ran.append(run_step(step, args.quick, remaining))
        # Kept beside the last runs of the benchmarks not run this time (--only), so the
        # report covers the whole suite with each benchmark's latest run.
        now = {r.name for r in ran}
        order = [s.name for s in STEPS]
        ran = sorted(
            [r for r in earlier if r.name not in now] + ran, key=lambda r: order.index(r.name)
        )
        RUNS.write_bytes(msgspec.json.format(msgspec.json.encode(ran)))
    else:
        ran = [r for r in earlier if r.name in {s.name for s in steps}]
    reports = {name: load(name) for step in STEPS for name in step.reports}
    command = " ".join([".venv/bin/python -m perf.run_all", *(argv or sys.argv[1:])])
    markdown, ok = render(
        ran, reports, quick=args.quick, started=started, load_start=load_start, command=command
    )
    (ROOT / "perf" / "REPORT.md").write_text(markdown)
    print(markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
