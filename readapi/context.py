"""What every read route is given (the read store and the cursor signer, from the app
state) and how it answers: msgspec-encoded JSON with the projection position it reflects."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Mapper
from starlette.requests import Request

from infra import auth
from infra.readstore import ReadStore, Row
from infra.signing import CheckpointSigner
from readapi.cache import ReadCache
from readapi.paging import CursorSigner

POSITION_HEADER = "X-Projection-Position"
UPSTREAM = "accubooks"


@dataclass(frozen=True)
class AuditTools:
    """What audit reads (readapi.audit) need besides the read store, given by the
    composition root: the checkpoint signer, the event log's mapper, and the replay of
    a tenant's dashboard (projections code, which readapi may not import)."""

    signer: CheckpointSigner
    # Decodes the stored bytes of an event (the event log's own mapper).
    mapper: Mapper[UUID]
    # Replays a tenant's decoded events, in log order, through the dashboard projection's
    # own code into a throwaway model; gives its dashboard row (projections.pointintime).
    replay_dashboard: Callable[[UUID, Iterable[tuple[Any, int]]], Row]


@dataclass(frozen=True)
class ReadApi:
    store: ReadStore
    signer: CursorSigner
    clock: Callable[[], datetime]
    # Longest a read waits for its X-Consistency-Token (readapi.consistency).
    read_your_writes_timeout_s: float = 2.0
    # No cache unless the composition root gives one (readapi.cache).
    cache: ReadCache = field(default_factory=lambda: ReadCache(None, prefix="", ttls={}))
    # Audit reads answer only when the composition root gives these (readapi.audit).
    audit: AuditTools | None = None
    # The event log's head position (blocking): a consistency token beyond it was never
    # issued, and is refused at once instead of waited on (readapi.consistency).
    log_head: Callable[[], int] | None = None


async def read_context(request: Request) -> tuple[ReadApi, auth.Principal]:
    api: ReadApi = request.state.read_api
    principal = await auth.principal_of(request)
    auth.require_role(principal, "writer", "reader", "auditor")
    return api, principal


def position_sql(store: ReadStore, projection: str) -> str:
    """A scalar subquery giving the projection's position inside the read's one statement."""
    return (
        f"(SELECT notification_id FROM {store.tracking_table(projection)}"
        f" WHERE application_name = '{UPSTREAM}')"
    )
