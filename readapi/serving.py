"""How every read is answered: through the read cache (readapi.cache), honouring the
request's X-Consistency-Token, with the database query in the threadpool under its
budget; the answer carries the position it reflects."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from infra.errors import OperationTimeoutError
from readapi.cache import key_name
from readapi.consistency import requested_position, wait_for_token
from readapi.context import POSITION_HEADER, ReadApi

# Set on the request when the cache failed during it; the service marks the answer
# degraded (X-Service-Status) from it.
CACHE_FAILED = "cache_failed"

_encoder = msgspec.json.Encoder()

Loader = Callable[[], tuple[msgspec.Struct, int | None]]


async def serve(
    request: Request,
    api: ReadApi,
    tenant_id: UUID,
    *,
    projection: str,
    operation: str,
    key: tuple[str, ...],
    load: Loader,
) -> Response:
    """Answers a read. ``key`` names the answer within the tenant's read model (the
    route and its validated parameters); ``load`` queries the database (blocking) and
    returns the body and the projection position it reflects."""
    token = requested_position(request)

    async def from_database() -> tuple[bytes, int]:
        if token:
            await wait_for_token(request, api, projection)
        try:
            body, position = await run_in_threadpool(load)
        except OperationTimeoutError as e:
            e.operation = e.operation or operation
            raise
        return _encoder.encode(body), int(position or 0)

    found = await api.cache.through(
        tenant_id=tenant_id,
        projection=projection,
        name=key_name(*key),
        token=token,
        load=from_database,
    )
    if found.degraded:
        setattr(request.state, CACHE_FAILED, True)
    return Response(
        found.body, media_type="application/json", headers={POSITION_HEADER: str(found.position)}
    )
