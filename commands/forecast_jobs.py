"""The forecast job: computes a requested forecast and records the outcome as events.

At-least-once delivery makes it idempotent: a finished forecast is skipped, and two
deliveries racing on one forecast collide on its version, so exactly one outcome is
recorded. The model runs in a child process killed at the time limit (NumPy cannot be
interrupted in-thread); a timeout or a model error is a recorded failure, not a retry.
Infrastructure errors (the store is down) raise, and the broker retries with backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import dramatiq
import msgspec

from domain import forecast_model
from domain.errors import ForecastFinishedError
from domain.events import Actor
from domain.forecast import ERROR, TIMEOUT, Forecast
from domain.scenario import Scenario
from infra import broker as jobs
from infra import killable
from infra.errors import RecordConflictError
from infra.eventstore import EventLog

logger = logging.getLogger("accubooks.jobs")

WORKER = "worker"


@dataclass(frozen=True)
class JobDeps:
    log: EventLog
    clock: Callable[[], datetime]
    timeout_s: float
    # Where the model runs: a killable child process by default.
    compute: Callable[..., Any] = killable.run


def generate_forecast(deps: JobDeps, forecast_id: str, message_id: str = "") -> None:
    forecast = deps.log.find(UUID(forecast_id), Forecast)
    if forecast is None or forecast.finished:
        return
    actor = Actor(tenant_id=forecast.tenant_id, actor_id=WORKER, request_id=message_id)
    forecast = _record(deps, forecast.id, lambda f: f.start(actor, at=deps.clock()))
    if forecast is None:
        return
    # The scenario as it was when the forecast was requested.
    scenario: Scenario = deps.log.repository.get(
        forecast.scenario_id, version=forecast.scenario_version or None
    )
    started = time.perf_counter()
    try:
        result = deps.compute(
            forecast_model.run_forecast,
            (scenario.baseline, scenario.assumptions),
            {
                "horizon_months": forecast.horizon_months,
                "paths": forecast.paths,
                "seed": forecast.id,
            },
            timeout_s=deps.timeout_s,
        )
    except killable.DeadlineExceededError as e:
        _finish(deps, forecast.id, actor, reason=TIMEOUT, message=str(e))
        return
    except killable.ChildFailedError as e:
        logger.error("forecast %s failed: %s", forecast_id, e)
        _finish(deps, forecast.id, actor, reason=ERROR, message=str(e))
        return
    seconds = round(time.perf_counter() - started, 6)
    payload: dict[str, Any] = msgspec.to_builtins(result)
    _record(
        deps,
        forecast.id,
        lambda f: f.complete(actor, result=payload, compute_seconds=seconds, at=deps.clock()),
    )


def _finish(deps: JobDeps, forecast_id: UUID, actor: Actor, *, reason: str, message: str) -> None:
    _record(
        deps,
        forecast_id,
        lambda f: f.fail(actor, reason=reason, message=message[:500], at=deps.clock()),
    )


def _record(
    deps: JobDeps, forecast_id: UUID, change: Callable[[Forecast], None], attempts: int = 5
) -> Forecast | None:
    """Applies ``change`` to the current forecast and saves it; None once it is finished
    (another delivery got there first)."""
    for _ in range(attempts):
        forecast = deps.log.find(forecast_id, Forecast)
        if forecast is None:
            return None
        try:
            change(forecast)
        except ForecastFinishedError:
            return None
        try:
            deps.log.save(forecast)
        except RecordConflictError:
            continue
        return forecast
    raise RecordConflictError(f"forecast {forecast_id} kept changing under the job")


def declare_actor(broker: dramatiq.Broker, deps: JobDeps) -> dramatiq.Actor[Any, None]:
    """Registers the job on ``broker`` with explicit retries and limits (Dramatiq's
    defaults retry 20 times over days)."""

    def generate(forecast_id: str) -> None:
        message = dramatiq.middleware.CurrentMessage.get_current_message()
        generate_forecast(deps, forecast_id, message.message_id if message else "")

    return dramatiq.Actor(
        generate,
        broker=broker,
        actor_name=jobs.GENERATE_FORECAST,
        queue_name=jobs.FORECAST_QUEUE,
        priority=0,
        options={
            "max_retries": 5,
            "min_backoff": 500,
            "max_backoff": 30_000,
            # Our own limit stops the model; this only bounds a job stuck elsewhere.
            "time_limit": round((deps.timeout_s + 60) * 1000),
        },
    )
