"""Command receipts: the memory of idempotency. A receipt is saved in the same transaction
as the events of the command it answers, so a command and its receipt exist together or
not at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import AggregateCreated, AggregateEvent, BaseAggregate

from domain.events import Actor, Attributed

_RECEIPT_NAMESPACE = UUID("0d7c52f4-2f4a-4f0e-8d0f-3b4f5d1b9a77")


def receipt_id_for(tenant_id: UUID, idempotency_key: str) -> UUID:
    """Keys are scoped to the tenant: two tenants may use the same key independently."""
    return uuid5(_RECEIPT_NAMESPACE, f"{tenant_id}\n{idempotency_key}")


class CommandReceipt(BaseAggregate[UUID]):
    TOPIC = "accubooks:CommandReceipt"

    class Event(AggregateEvent, Attributed):
        pass

    class Recorded(Event, AggregateCreated):
        TOPIC = "accubooks:CommandReceipt.Recorded"
        idempotency_key: str
        route: str
        fingerprint: str
        status: int
        body: str
        headers: dict[str, str]

    def __init__(
        self,
        tenant_id: UUID,
        idempotency_key: str,
        route: str,
        fingerprint: str,
        status: int,
        body: str,
        headers: dict[str, str],
        **_: Any,
    ) -> None:
        self.tenant_id = tenant_id
        self.idempotency_key = idempotency_key
        self.route = route
        self.fingerprint = fingerprint
        self.status = status
        self.body = body
        self.headers = headers

    @classmethod
    def record(
        cls,
        actor: Actor,
        *,
        idempotency_key: str,
        route: str,
        fingerprint: str,
        status: int,
        body: str,
        headers: dict[str, str],
        at: datetime,
    ) -> CommandReceipt:
        return cls._create(
            cls.Recorded,
            id=receipt_id_for(actor.tenant_id, idempotency_key),
            timestamp=at,
            idempotency_key=idempotency_key,
            route=route,
            fingerprint=fingerprint,
            status=status,
            body=body,
            headers=headers,
            **actor.attribution(),
        )
