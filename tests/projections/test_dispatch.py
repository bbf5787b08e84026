"""The dispatcher sends a job for every forecast requested and not already finished in the
same batch: catching up on a long log must not flood the workers with finished forecasts,
and no forecast still waiting may be left without its job."""

from __future__ import annotations

import uuid
from typing import Any

from domain import scenario_spec as spec
from domain.events import Actor
from domain.forecast import Forecast
from domain.scenario import Scenario
from infra.clock import utc_now
from projections.dispatch import DispatchProjector
from tests.conftest import scenario_body


def events_of(*aggregates: Any) -> list[tuple[Any, int]]:
    collected = [event for aggregate in aggregates for event in aggregate.collect_events()]
    return [(event, position) for position, event in enumerate(collected, start=1)]


def test_only_forecasts_not_finished_in_the_batch_are_sent() -> None:
    actor = Actor(tenant_id=uuid.uuid4(), actor_id="test", request_id="r")
    scenario = Scenario.create(
        actor,
        scenario_id=uuid.uuid4(),
        name="s",
        baseline=spec.baseline_from_payload(scenario_body()["baseline"]),
        assumptions=spec.assumptions_from_payload({"type": "COST_REDUCTION", "percent": 10}),
        at=utc_now(),
    )

    def requested() -> Forecast:
        return Forecast.request(
            actor,
            forecast_id=uuid.uuid4(),
            scenario=scenario,
            horizon_months=12,
            paths=100,
            at=utc_now(),
        )

    waiting, running, completed, failed = requested(), requested(), requested(), requested()
    for forecast in (running, completed, failed):
        forecast.start(actor, at=utc_now())
    completed.complete(actor, result={}, compute_seconds=0.1, at=utc_now())
    failed.fail(actor, reason="ERROR", message="boom", at=utc_now())
    sent: list[str] = []

    DispatchProjector(sent.append).apply(
        None,  # type: ignore[arg-type]  # the dispatcher writes no table
        events_of(scenario, waiting, running, completed, failed),
    )

    assert sorted(sent) == sorted([str(waiting.id), str(running.id)])
