"""What every read route is given (the read store and the cursor signer, from the app
state) and how it answers: msgspec-encoded JSON with the projection position it reflects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from starlette.requests import Request

from infra import auth
from infra.readstore import ReadStore
from readapi.cache import ReadCache
from readapi.paging import CursorSigner

POSITION_HEADER = "X-Projection-Position"
UPSTREAM = "accubooks"


@dataclass(frozen=True)
class ReadApi:
    store: ReadStore
    signer: CursorSigner
    clock: Callable[[], datetime]
    # Longest a read waits for its X-Consistency-Token (readapi.consistency).
    read_your_writes_timeout_s: float = 2.0
    # No cache unless the composition root gives one (readapi.cache).
    cache: ReadCache = field(default_factory=lambda: ReadCache(None, prefix="", ttls={}))


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
