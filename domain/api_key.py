"""API keys: one aggregate per key, whose id is derived from the key's hash, so that
authenticating a request is one lookup by primary key, never a scan.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal
from uuid import UUID, uuid5

from eventsourcing.domain import AggregateCreated, AggregateEvent, BaseAggregate

from domain.errors import KeyRevokedError, UnknownRoleError
from domain.events import Actor, Attributed

Role = Literal["writer", "reader", "auditor"]
ROLES: tuple[Role, ...] = ("writer", "reader", "auditor")

_KEY_NAMESPACE = UUID("5b1f3f0e-8f6e-4c59-9a53-7a0f0b6f4c21")


def hash_key(secret: str) -> str:
    """The stored form of a key. Keys are 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_for(key_hash: str) -> UUID:
    return uuid5(_KEY_NAMESPACE, key_hash)


class ApiKey(BaseAggregate[UUID]):
    TOPIC = "accubooks:ApiKey"

    class Event(AggregateEvent, Attributed):
        pass

    class Issued(Event, AggregateCreated):
        TOPIC = "accubooks:ApiKey.Issued"
        role: str
        key_hash: str

    class Revoked(Event):
        TOPIC = "accubooks:ApiKey.Revoked"

        def apply(self, aggregate: Any) -> None:
            aggregate.revoked = True

    def __init__(self, tenant_id: UUID, role: Role, key_hash: str, **_: Any) -> None:
        self.tenant_id = tenant_id
        self.role: Role = role
        self.key_hash = key_hash
        self.revoked = False

    @classmethod
    def issue(cls, actor: Actor, key_hash: str, role: Role, *, at: datetime) -> ApiKey:
        if role not in ROLES:
            raise UnknownRoleError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return cls._create(
            cls.Issued,
            id=key_id_for(key_hash),
            timestamp=at,
            role=role,
            key_hash=key_hash,
            **actor.attribution(),
        )

    def revoke(self, actor: Actor, *, at: datetime) -> None:
        if self.revoked:
            raise KeyRevokedError(f"key {self.id} is already revoked")
        self.trigger_event(self.Revoked, timestamp=at, **actor.attribution())
