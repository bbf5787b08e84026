"""Forecast request-to-completed latency in the production topology on this machine:
PostgreSQL, `accubooks api`, `accubooks project` (the dispatcher), `accubooks worker` on a
Redis broker. Forecasts are requested one at a time over HTTP; for each, the time from the
202 to the first GET that shows it completed. The baseline, measured in the same run, is
the model alone in this process for the same size (the floor no pipeline can beat).

Run from the repository root (PostgreSQL on 127.0.0.1:5432 trust/postgres, Redis on
127.0.0.1:6379; it uses Redis database 14 and flushes it before and after):

    .venv/bin/python -m perf.forecast_latency --forecasts 40 --months 120 --paths 10000

Writes perf/reports/forecast_latency.md and .json and prints them; exits 1 when a forecast
does not complete within the budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal

import httpx2 as httpx
import msgspec
import redis

from domain import forecast_model
from domain import scenario_spec as spec
from perf.harness import ADMIN_URL, Deadline, git_head, postgres_database, write_report
from perf.processes import accubooks, accubooks_json

REDIS_URL = "redis://127.0.0.1:6379/14"


class Report(msgspec.Struct, frozen=True, kw_only=True):
    command: str
    forecasts: int
    months: int
    paths: int
    completed: int
    model_alone_p50_ms: float
    request_to_completed_p50_ms: float
    request_to_completed_p95_ms: float
    request_to_completed_max_ms: float
    ratio_p50_over_model: float
    nproc: int
    load_average: float
    date: str
    git_head: str


def model_alone(months: int, paths: int, runs: int = 5) -> float:
    baseline = spec.Baseline(
        start_month="2026-01",
        opening_cash=Decimal("250000.00"),
        monthly_revenue=Decimal("40000.00"),
        monthly_costs=Decimal("35000.00"),
    )
    assumptions = spec.Hiring(headcount=2, monthly_cost_per_head=Decimal("6500.00"))
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        forecast_model.run_forecast(
            baseline, assumptions, horizon_months=months, paths=paths, seed=uuid.uuid4()
        )
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forecasts", type=int, default=40)
    parser.add_argument("--months", type=int, default=120)
    parser.add_argument("--paths", type=int, default=10_000)
    parser.add_argument("--budget-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    deadline = Deadline(time.monotonic() + args.budget_s)
    broker_redis = redis.Redis.from_url(REDIS_URL)
    broker_redis.flushdb()
    latencies: list[float] = []
    try:
        with ExitStack() as stack:
            url = stack.enter_context(postgres_database(ADMIN_URL))
            tenant = accubooks_json(["tenants", "create", "perf"], url, deadline)
            key = accubooks_json(
                ["keys", "issue", tenant["tenantId"], "--role", "writer"], url, deadline
            )["key"]
            env = {"BROKER_URL": REDIS_URL}
            api = stack.enter_context(accubooks(["api", "--port", "0"], url, env))
            base = api.first_line(deadline)["url"]
            stack.enter_context(accubooks(["project"], url, env)).first_line(deadline)
            stack.enter_context(accubooks(["worker"], url, env)).first_line(deadline)
            client = stack.enter_context(httpx.Client(base_url=base, timeout=10, trust_env=False))
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            body = {
                "name": "perf",
                "type": "HIRING",
                "baseline": {
                    "startMonth": "2026-01",
                    "openingCash": "250000",
                    "monthlyRevenue": "40000",
                    "monthlyCosts": "35000",
                },
                "assumptions": {"headcount": 2, "monthlyCostPerHead": "6500"},
            }
            created = client.post(
                "/api/scenarios", json=body, headers={**headers, "Idempotency-Key": "s"}
            )
            scenario_id = created.json()["id"]
            for n in range(args.forecasts + 1):
                accepted = client.post(
                    "/api/forecasts/generate",
                    json={
                        "scenarioId": scenario_id,
                        "horizonMonths": args.months,
                        "paths": args.paths,
                    },
                    headers={**headers, "Idempotency-Key": f"f{n}"},
                )
                assert accepted.status_code == 202, accepted.text
                started = time.perf_counter()
                path = f"/api/forecasts/{accepted.json()['forecastId']}"
                while not deadline.expired():
                    seen = client.get(path, headers=headers)
                    if seen.status_code == 200 and seen.json()["status"] == "completed":
                        break
                    time.sleep(0.002)  # a tight poll, bounded by the budget
                else:
                    print(f"forecast {n} did not complete in the budget")
                    return 1
                if n:  # the first one warms the pipeline up
                    latencies.append((time.perf_counter() - started) * 1000)
    finally:
        broker_redis.flushdb()
    alone = model_alone(args.months, args.paths)
    ordered = sorted(latencies)
    report = Report(
        command=f".venv/bin/python -m perf.forecast_latency --forecasts {args.forecasts}"
        f" --months {args.months} --paths {args.paths}",
        forecasts=args.forecasts,
        months=args.months,
        paths=args.paths,
        completed=len(latencies),
        model_alone_p50_ms=round(alone, 1),
        request_to_completed_p50_ms=round(statistics.median(ordered), 1),
        request_to_completed_p95_ms=round(ordered[int(0.95 * (len(ordered) - 1))], 1),
        request_to_completed_max_ms=round(ordered[-1], 1),
        ratio_p50_over_model=round(statistics.median(ordered) / alone, 2),
        nproc=os.cpu_count() or 0,
        load_average=round(os.getloadavg()[0], 2),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        git_head=git_head(),
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in msgspec.structs.asdict(report).items())
    markdown = (
        "# Forecast request-to-completed latency (PostgreSQL, Redis broker, 3 processes)\n\n"
        "| figure | value |\n|---|---|\n" + rows + "\n\n"
        "ratio_p50_over_model: the pipeline's median latency over the model alone in one"
        " process; what the log, the dispatcher, the broker, the child process and the"
        " read model add on top of the computation.\n"
    )
    write_report("forecast_latency", markdown, report)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
