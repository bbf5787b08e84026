"""Read-your-writes: a read that sends a command's ``X-Consistency-Token`` (a log
position) is answered only once the projection it reads has reached that position,
waiting at most ``ReadApi.read_your_writes_timeout_s`` (then 503 OPERATION_TIMEOUT). A
token beyond the log's head was never issued: 400 VALIDATION_ERROR at once.

Without the header nothing is queried. With it, one cheap statement when the projection
is already there; otherwise the tracking position is polled with a short backoff
(1 ms doubling to 20 ms), each check in the threadpool and the pauses on the event loop,
so a waiting read holds no thread.
"""

from __future__ import annotations

import re
import time

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from infra.readstore import ReadStore
from readapi.context import ReadApi, position_sql
from readapi.errors import QueryValidationError, ReadYourWritesTimeoutError

CONSISTENCY_HEADER = "X-Consistency-Token"
# Positions are notification ids (BIGINT): at most 18 digits keeps them in range.
_TOKEN = re.compile(r"[0-9]{1,18}")
_FIRST_PAUSE_S = 0.001
_LONGEST_PAUSE_S = 0.02


def requested_position(request: Request) -> int | None:
    """The read's X-Consistency-Token, if sent; malformed -> VALIDATION_ERROR."""
    raw = request.headers.get(CONSISTENCY_HEADER)
    if raw is None:
        return None
    if not _TOKEN.fullmatch(raw):
        raise QueryValidationError(f"{CONSISTENCY_HEADER} must be a non-negative integer")
    return int(raw)


def projection_position(store: ReadStore, projection: str) -> int:
    """The projection's tracking position, in one statement."""
    [row] = store.query(projection, f"SELECT {position_sql(store, projection)} AS position")
    return int(row["position"] or 0)


async def wait_for_token(request: Request, api: ReadApi, projection: str) -> None:
    """Returns once ``projection`` has reached the request's token (at once without one)."""
    token = requested_position(request)
    if not token:
        return
    deadline = time.monotonic() + api.read_your_writes_timeout_s
    pause = _FIRST_PAUSE_S
    checked_head = False
    while await run_in_threadpool(projection_position, api.store, projection) < token:
        if not checked_head and api.log_head is not None:
            # Tokens are positions of acknowledged commands, so never beyond the log's
            # head: one that is was not issued by us, and waiting would only end in a 503.
            checked_head = True
            head = await run_in_threadpool(api.log_head)
            if token > head:
                raise QueryValidationError(
                    f"{CONSISTENCY_HEADER} {token} is beyond the log's head ({head}):"
                    " it is not a position any command was acknowledged at"
                )
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReadYourWritesTimeoutError(
                f"the {projection} read model did not reach position {token}"
                f" within {api.read_your_writes_timeout_s:g} s"
            )
        await anyio.sleep(min(pause, left))
        pause = min(pause * 2, _LONGEST_PAUSE_S)
