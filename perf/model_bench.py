"""Forecast model speed: run_forecast over 120 months for 2,000, 10,000 and 100,000 paths
(median of several runs), quoted against a baseline measured in the same run: drawing the
same 120 x paths float32 standard normals from the same generator (PCG64), the floor of
any Monte Carlo of this size. Peak memory is traced in a separate, untimed run.

Run from the repository root:

    .venv/bin/python -m perf.model_bench

Options: --runs 7 --horizon 120 --paths 2000,10000,100000 --budget-ms 1000. It prints the
report and writes perf/reports/model.md and perf/reports/model.json; it exits 1 when the
largest size's median is over the budget. OPENBLAS_CORETYPE is reported, never changed
(the model does not call BLAS).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import numpy as np

from domain import forecast_model as fm
from domain import scenario_spec as spec
from perf.harness import git_head, write_report

FORECAST_ID = uuid.UUID("5b0c1f9e-8a7d-4c3b-9e21-6f4d2a8c7e10")
BASELINE = spec.Baseline(
    start_month="2026-01",
    opening_cash=Decimal("250000.00"),
    monthly_revenue=Decimal("40000.00"),
    monthly_costs=Decimal("35000.50"),
    revenue_growth_rate=0.02,
    cost_growth_rate=0.01,
)
ASSUMPTIONS = spec.Hiring(headcount=2, monthly_cost_per_head=Decimal("6500"), start_offset_months=1)


class Size(msgspec.Struct, frozen=True, kw_only=True):
    paths: int
    model_ms_median: float
    model_ms_min: float
    normals_ms_median: float
    model_over_normals: float
    ns_per_path_month: float
    peak_mb: float


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    loadavg_1m_at_start: float
    python: str
    numpy: str
    openblas_coretype: str | None
    date: str
    git_head: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    command: str
    horizon_months: int
    runs: int
    block_values: int
    budget_ms: float
    machine: Machine
    sizes: list[Size]
    largest_over_smallest_per_path: float


def machine_facts() -> Machine:
    return Machine(
        nproc=len(os.sched_getaffinity(0)),
        loadavg_1m_at_start=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        numpy=np.__version__,
        openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        git_head=git_head(),
    )


def _timed_ms(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000


def _peak_mb(work: Callable[[], object]) -> float:
    # NumPy reports its buffers to tracemalloc, so this is the arrays' peak too.
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def measure(paths: int, *, horizon: int, runs: int) -> Size:
    def model() -> fm.ForecastResult:
        return fm.run_forecast(
            BASELINE, ASSUMPTIONS, horizon_months=horizon, paths=paths, seed=FORECAST_ID
        )

    def normals() -> np.ndarray[tuple[int, int], np.dtype[np.float32]]:
        return fm.generator(FORECAST_ID).standard_normal((horizon, paths), dtype=np.float32)

    model()  # warm-up: first-touch page faults and lazy imports are not the model's cost
    normals()
    model_ms: list[float] = []
    normals_ms: list[float] = []
    for _ in range(runs):  # interleaved, so both see the same load on the machine
        normals_ms.append(_timed_ms(normals))
        model_ms.append(_timed_ms(model))
    median = statistics.median(model_ms)
    baseline = statistics.median(normals_ms)
    return Size(
        paths=paths,
        model_ms_median=round(median, 1),
        model_ms_min=round(min(model_ms), 1),
        normals_ms_median=round(baseline, 1),
        model_over_normals=round(median / baseline, 2) if baseline > 0 else float("nan"),
        ns_per_path_month=round(median * 1e6 / (paths * horizon), 1),
        peak_mb=round(_peak_mb(model), 1),
    )


def render_markdown(report: Report) -> str:
    m = report.machine
    lines = [
        "# Forecast model benchmark",
        "",
        f"`{report.command}` — {'ok' if report.ok else '**OVER BUDGET**'} "
        f"(budget {report.budget_ms:.0f} ms for the largest size)",
        "",
        f"{report.horizon_months} months, median of {report.runs} runs, "
        f"blocks of about {report.block_values:,} path-months.",
        "",
        "| paths | model ms (median) | model ms (min) | normals ms (median) | model / normals "
        "| ns per path-month | peak MB |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in report.sizes:
        lines.append(
            f"| {s.paths:,} | {s.model_ms_median:.1f} | {s.model_ms_min:.1f} "
            f"| {s.normals_ms_median:.1f} | {s.model_over_normals:.2f} "
            f"| {s.ns_per_path_month:.1f} | {s.peak_mb:.1f} |"
        )
    lines += [
        "",
        "The baseline draws the same 120 x paths float32 standard normals from the same "
        "generator (PCG64) and does nothing else: model / normals is what the walk, the "
        "factors, the cash deviations, the percentiles and the rounding add on top of the "
        "random numbers themselves.",
        f"Per path, the largest size costs {report.largest_over_smallest_per_path:.2f} x "
        "the smallest (near 1: linear in the paths; fixed costs show at small sizes).",
        "Peak MB is traced (tracemalloc) in a separate run: the month blocks bound it, "
        "whole 120 x paths matrices would need several times more.",
        "",
        f"Machine: nproc {m.nproc}, load average (1 min) at start {m.loadavg_1m_at_start}, "
        f"Python {m.python}, NumPy {m.numpy}, OPENBLAS_CORETYPE {m.openblas_coretype or '-'}; "
        f"{m.date}; git HEAD {m.git_head}. Single-threaded; other work on the machine "
        "shows in the medians.",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perf.model_bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per size")
    parser.add_argument("--horizon", type=int, default=120, help="months (1-120)")
    parser.add_argument("--paths", default="2000,10000,100000", help="comma-separated sizes")
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="for the largest size")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = sorted(int(part) for part in args.paths.split(","))
    if args.runs < 1 or not 1 <= args.horizon <= 120 or sizes[0] < 1:
        raise SystemExit("--runs and --paths must be at least 1, --horizon within 1-120")
    machine = machine_facts()
    measured = [measure(paths, horizon=args.horizon, runs=args.runs) for paths in sizes]
    largest, smallest = measured[-1], measured[0]
    report = Report(
        ok=largest.model_ms_median <= args.budget_ms,
        command=" ".join([".venv/bin/python -m perf.model_bench", *(argv or sys.argv[1:])]),
        horizon_months=args.horizon,
        runs=args.runs,
        block_values=fm.BLOCK_VALUES,
        budget_ms=args.budget_ms,
        machine=machine,
        sizes=measured,
        largest_over_smallest_per_path=round(
            largest.ns_per_path_month / smallest.ns_per_path_month, 2
        ),
    )
    markdown = render_markdown(report)
    print(markdown)
    write_report("model", markdown, report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
