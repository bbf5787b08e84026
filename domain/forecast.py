"""The forecast: a projection of one scenario over a horizon, its own aggregate so that its
life (queued, running, completed or failed) never locks the scenario.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final
from uuid import UUID

import msgspec
from eventsourcing.domain import AggregateCreated, AggregateEvent, BaseAggregate

from domain.events import Actor, Attributed
from domain.scenario import Scenario

QUEUED = "queued"
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

    def __init__(
        self, tenant_id: UUID, scenario_id: UUID, horizon_months: int, paths: int, **_: Any
    ) -> None:
        self.tenant_id = tenant_id
        self.scenario_id = scenario_id
        self.horizon_months = horizon_months
        self.paths = paths
        self.status = QUEUED

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
            **actor.attribution(),
        )
