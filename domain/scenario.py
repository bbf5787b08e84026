"""The scenario: a "what if" on a tenant's baseline. Its type is fixed at creation; name,
baseline and assumptions change by events until it is archived, after which nothing does.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import AggregateCreated, AggregateEvent, BaseAggregate

from domain import scenario_spec as spec
from domain.errors import ForeignTenantError, ScenarioArchivedError, ScenarioTypeChangeError
from domain.events import Actor, Attributed

ACTIVE = "active"
ARCHIVED = "archived"


class Scenario(BaseAggregate[UUID]):
    TOPIC = "accubooks:Scenario"

    class Event(AggregateEvent, Attributed):
        pass

    class Created(Event, AggregateCreated):
        TOPIC = "accubooks:Scenario.Created"
        name: str
        baseline: dict[str, Any]
        assumptions: dict[str, Any]

    class Renamed(Event):
        TOPIC = "accubooks:Scenario.Renamed"
        name: str

        def apply(self, aggregate: Any) -> None:
            aggregate.name = self.name

    class BaselineChanged(Event):
        TOPIC = "accubooks:Scenario.BaselineChanged"
        baseline: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            aggregate.baseline = spec.baseline_from_payload(self.baseline)

    class AssumptionsChanged(Event):
        TOPIC = "accubooks:Scenario.AssumptionsChanged"
        assumptions: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            aggregate.assumptions = spec.assumptions_from_payload(self.assumptions)

    class Archived(Event):
        TOPIC = "accubooks:Scenario.Archived"

        def apply(self, aggregate: Any) -> None:
            aggregate.status = ARCHIVED

    def __init__(
        self,
        tenant_id: UUID,
        name: str,
        baseline: dict[str, Any],
        assumptions: dict[str, Any],
        **_: Any,
    ) -> None:
        self.tenant_id = tenant_id
        self.name = name
        self.baseline = spec.baseline_from_payload(baseline)
        self.assumptions = spec.assumptions_from_payload(assumptions)
        self.status = ACTIVE

    @property
    def type(self) -> spec.ScenarioType:
        return spec.scenario_type(self.assumptions)

    @classmethod
    def create(
        cls,
        actor: Actor,
        *,
        scenario_id: UUID,
        name: str,
        baseline: spec.Baseline,
        assumptions: spec.Assumptions,
        at: datetime,
    ) -> Scenario:
        return cls._create(
            cls.Created,
            id=scenario_id,
            timestamp=at,
            name=name,
            baseline=_checked(spec.baseline_payload(baseline), spec.baseline_from_payload),
            assumptions=_checked(
                spec.assumptions_payload(assumptions), spec.assumptions_from_payload
            ),
            **actor.attribution(),
        )

    def update(
        self,
        actor: Actor,
        *,
        name: str | None = None,
        baseline: spec.Baseline | None = None,
        assumptions: spec.Assumptions | None = None,
        at: datetime,
    ) -> None:
        """Records one event per part that really changes; an update that changes nothing
        records nothing (and so leaves the version as it was)."""
        self.ensure_owned_by(actor)
        self.ensure_active()
        if assumptions is not None and spec.scenario_type(assumptions) != self.type:
            raise ScenarioTypeChangeError("the assumptions of a scenario keep its type")
        # Every part is checked before any event is recorded: an update is all or nothing.
        baseline_payload = (
            None
            if baseline is None or baseline == self.baseline
            else _checked(spec.baseline_payload(baseline), spec.baseline_from_payload)
        )
        assumptions_payload = (
            None
            if assumptions is None or assumptions == self.assumptions
            else _checked(spec.assumptions_payload(assumptions), spec.assumptions_from_payload)
        )
        who = actor.attribution()
        if name is not None and name != self.name:
            self.trigger_event(self.Renamed, timestamp=at, name=name, **who)
        if baseline_payload is not None:
            self.trigger_event(self.BaselineChanged, timestamp=at, baseline=baseline_payload, **who)
        if assumptions_payload is not None:
            self.trigger_event(
                self.AssumptionsChanged, timestamp=at, assumptions=assumptions_payload, **who
            )

    def archive(self, actor: Actor, *, at: datetime) -> None:
        self.ensure_owned_by(actor)
        self.ensure_active()
        self.trigger_event(self.Archived, timestamp=at, **actor.attribution())

    def ensure_owned_by(self, actor: Actor) -> None:
        if actor.tenant_id != self.tenant_id:
            raise ForeignTenantError(f"scenario {self.id} not found")

    def ensure_active(self) -> None:
        if self.status == ARCHIVED:
            raise ScenarioArchivedError(f"scenario {self.id} is archived")


def _checked(payload: dict[str, Any], decode: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """The payload, once it is known to decode (struct constructors skip range checks)."""
    try:
        decode(payload)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid scenario values: {e}") from e
    return payload
