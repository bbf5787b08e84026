"""What every event of the log carries besides its payload: who did it, for which tenant,
from which request. The log alone then answers "who did what, when, from where".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

# The acting key id of events that no API key caused (the operator's CLI).
OPERATOR = "operator"


@dataclass(frozen=True)
class Attributed:
    tenant_id: UUID
    actor_id: str
    request_id: str


@dataclass(frozen=True)
class Actor:
    """The caller of a command, passed into every domain decision."""

    tenant_id: UUID
    actor_id: str
    request_id: str

    def attribution(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "actor_id": self.actor_id,
            "request_id": self.request_id,
        }
