"""The tenant: the unit of isolation. Every other aggregate names the tenant it belongs to."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import AggregateCreated, AggregateEvent, BaseAggregate

from domain.events import Actor, Attributed


class Tenant(BaseAggregate[UUID]):
    TOPIC = "accubooks:Tenant"

    class Event(AggregateEvent, Attributed):
        pass

    class Registered(Event, AggregateCreated):
        TOPIC = "accubooks:Tenant.Registered"
        name: str

    def __init__(self, tenant_id: UUID, name: str, **_: Any) -> None:
        self.tenant_id = tenant_id
        self.name = name

    @classmethod
    def register(cls, actor: Actor, name: str, *, at: datetime) -> Tenant:
        # A tenant's own events carry its id as their tenant id, like every other event.
        return cls._create(
            cls.Registered, id=actor.tenant_id, timestamp=at, name=name, **actor.attribution()
        )
