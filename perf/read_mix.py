"""The seed's read mix: its endpoints and their shares, a plan drawn from them over seeded
tenants (for perf/read_mix.lua), and a sample of its answers checked one by one."""

from __future__ import annotations

import random

import httpx2 as httpx
import msgspec

from perf.harness import REQUEST_TIMEOUT_S
from perf.seeding import TenantReads
from perf.wrk import PlanLine

# The seed's read endpoints (its "verified endpoints" and load-test routes, see issue 7)
# and the share of requests each gets. The seed names the endpoints but gives no weights:
# these favour the list and detail pages a client opens most, with the dashboard (the
# seed's slowest read) well represented.
MIX: dict[str, int] = {
    "scenario list": 30,
    "scenario detail": 25,
    "forecast list": 15,
    "forecast detail": 10,
    "dashboard": 15,
    "usage": 5,
}
PAGE_LIMIT = 20
SAMPLE_REQUESTS = 200  # answers checked with httpx2 after a run
DEGRADED = "degraded"
STATUS_HEADER = "x-service-status"


def draw_plan(reads: list[TenantReads], size: int, rng: random.Random) -> list[PlanLine]:
    """``size`` requests drawn in the mix's proportions over every tenant: scenario list
    pages 1-5 (70 % page 1), forecast list page 1 or filtered by a scenario, ids drawn
    uniformly from the tenant's."""
    routes = list(MIX)
    lines: list[PlanLine] = []
    for route in rng.choices(routes, weights=[MIX[r] for r in routes], k=size):
        tenant = rng.choice(reads)
        if route == "scenario list":
            page = 1 if rng.random() < 0.7 else rng.randint(2, 5)
            target = f"/api/scenarios?page={page}&limit={PAGE_LIMIT}"
        elif route == "scenario detail":
            target = f"/api/scenarios/{rng.choice(tenant.scenario_ids)}"
        elif route == "forecast list":
            target = (
                f"/api/forecasts?limit={PAGE_LIMIT}"
                if rng.random() < 0.6
                else f"/api/forecasts?scenarioId={rng.choice(tenant.scenario_ids)}"
            )
        elif route == "forecast detail":
            target = f"/api/forecasts/{rng.choice(tenant.forecast_ids)}"
        elif route == "dashboard":
            target = "/api/dashboard"
        else:
            target = "/api/usage"
        lines.append(PlanLine(route, target, tenant.key))
    return lines


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """Answers of a plan fetched one by one with httpx2 right after a run."""

    requests: int
    ok_200: int
    degraded: int
    statuses: dict[str, int]


def sample(url: str, plan: list[PlanLine], rng: random.Random) -> Sample:
    """SAMPLE_REQUESTS requests drawn from ``plan``, one at a time: their statuses and how
    many say the service is degraded."""
    statuses: dict[str, int] = {}
    degraded = 0
    picked = rng.choices(plan, k=SAMPLE_REQUESTS)
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        for line in picked:
            headers = {"Authorization": f"Bearer {line.key}"} if line.key is not None else {}
            response = client.get(line.path, headers=headers)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            degraded += response.headers.get(STATUS_HEADER) == DEGRADED
    return Sample(
        requests=len(picked), ok_200=statuses.get("200", 0), degraded=degraded, statuses=statuses
    )
