"""The forecast: a projection of one scenario over a horizon, its own aggregate so that its
life (queued, running, completed or failed) never locks the scenario.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final
from uuid import UUID

import msgspec
from eventsourcing.domain import AggregateCreated, AggregateEvent, BaseAggregate

from domain.errors import ForecastFinishedError
from domain.events import Actor, Attributed
from domain.scenario import Scenario

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
# Why a forecast failed: over its time limit, or an error computing it.
TIMEOUT = "TIMEOUT"
ERROR = "ERROR"
DEFAULT_PATHS: Final = 2000
HorizonMonths = Annotated[int, msgspec.Meta(ge=1, le=120)]
Paths = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class Forecast(BaseAggregate[UUID]):
    TOPIC = "accubooks:Forecast"

    class Event(AggregateEvent, Attributed):
        pass

    class Requested(Event, AggregateCreated):
        TOPIC = "accubooks:Forecast.Requested"
        scenario_id: UUID
        horizon_months: int
        paths: int
        # The scenario's version when requested: the forecast models that state, even if
        # the scenario changes before a worker gets to it. 0 in events stored before it.
        scenario_version: int = 0

    class Started(Event):
        TOPIC = "accubooks:Forecast.Started"
        attempt: int

        def apply(self, aggregate: Any) -> None:
            aggregate.status = RUNNING
            aggregate.attempts = self.attempt

    class Completed(Event):
        TOPIC = "accubooks:Forecast.Completed"
        result: dict[str, Any]
        compute_seconds: float

        def apply(self, aggregate: Any) -> None:
            aggregate.status = COMPLETED
            aggregate.result = self.result
            aggregate.compute_seconds = self.compute_seconds

    class Failed(Event):
        TOPIC = "accubooks:Forecast.Failed"
        reason: str
        message: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = FAILED
            aggregate.failure_reason = self.reason

    def __init__(
        self,
        tenant_id: UUID,
        scenario_id: UUID,
        horizon_months: int,
        paths: int,
        scenario_version: int = 0,
        **_: Any,
    ) -> None:
        self.tenant_id = tenant_id
        self.scenario_id = scenario_id
        self.horizon_months = horizon_months
        self.paths = paths
        self.scenario_version = scenario_version
        self.status = QUEUED
        self.attempts = 0
        self.result: dict[str, Any] | None = None
        self.compute_seconds = 0.0
        self.failure_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in (COMPLETED, FAILED)

    @classmethod
    def request(
        cls,
        actor: Actor,
        *,
        forecast_id: UUID,
        scenario: Scenario,
        horizon_months: int,
        paths: int,
        at: datetime,
    ) -> Forecast:
        scenario.ensure_owned_by(actor)
        scenario.ensure_active()
        return cls._create(
            cls.Requested,
            id=forecast_id,
            timestamp=at,
            scenario_id=scenario.id,
            horizon_months=horizon_months,
            paths=paths,
            scenario_version=scenario.version,
            **actor.attribution(),
        )

    def start(self, actor: Actor, *, at: datetime) -> None:
        """A worker took the job (again, after a crash: attempts count the takes)."""
        self._ensure_unfinished()
        self.trigger_event(
            self.Started, timestamp=at, attempt=self.attempts + 1, **actor.attribution()
        )

    def complete(
        self, actor: Actor, *, result: dict[str, Any], compute_seconds: float, at: datetime
    ) -> None:
        self._ensure_unfinished()
        self.trigger_event(
            self.Completed,
            timestamp=at,
            result=result,
            compute_seconds=compute_seconds,
            **actor.attribution(),
        )

    def fail(self, actor: Actor, *, reason: str, message: str, at: datetime) -> None:
        self._ensure_unfinished()
        self.trigger_event(
            self.Failed, timestamp=at, reason=reason, message=message, **actor.attribution()
        )

    def _ensure_unfinished(self) -> None:
        if self.finished:
            raise ForecastFinishedError(f"forecast {self.id} is already {self.status}")
