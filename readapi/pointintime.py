"""Point in time (auditor keys only): the tenant's dashboard as it was at a log position
or a time, replayed from the tenant's events in the audit read model by the dashboard
projection's own code (the replay is given by the composition root, since readapi may not
import projections). Never cached; X-Consistency-Token is honoured."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from infra import apidoc
from infra.readstore import ReadStore
from readapi import audit
from readapi.context import AuditTools
from readapi.dashboard import Dashboard, dashboard_of
from readapi.errors import QueryValidationError

# Rows per statement while replaying a tenant's log.
REPLAY_PAGE = 1000
# RFC 3339 with its offset; a space before the offset is a `+` that the query string
# decoded (an unencoded `+02:00`), taken back as `+`.
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(?P<offset>[Zz]|[+ -][0-9]{2}:[0-9]{2})"
)


def as_of(raw: str | None) -> int | datetime:
    """`asOf`: a log position (a non-negative integer) or an RFC 3339 timestamp."""
    if not raw:
        raise QueryValidationError("`asOf` is required: a log position or an RFC 3339 time")
    if audit.POSITION.fullmatch(raw) and int(raw) <= audit.LAST_POSITION:
        return int(raw)
    matched = _TIMESTAMP.fullmatch(raw)
    if matched is not None:
        if matched["offset"].startswith(" "):
            raw = raw[: matched.start("offset")] + "+" + raw[matched.start("offset") + 1 :]
        try:
            return datetime.fromisoformat(raw)
        except ValueError:
            pass
    raise QueryValidationError("`asOf` must be a log position or an RFC 3339 timestamp")


class _Replay:
    """The tenant's events up to a point, decoded, streamed a page per statement.

    Up to a position: every event at or before it. Up to a time: the longest start of the
    tenant's log recorded at or before it. Event times come from process clocks and may be
    out of log order by a skew, so the walk stops at the first later one rather than skip
    it: what is replayed is always a prefix of the log, a state that really existed.
    ``position`` is then the log position the replay reflects (asOf=position gives the
    same answer)."""

    def __init__(self, store: ReadStore, tools: AuditTools, tenant_id: UUID, point: int | datetime):
        self._store = store
        self._tools = tools
        self._tenant_id = tenant_id
        self._point = point
        self.position = 0

    def events(self) -> Iterator[tuple[Any, int]]:
        point = self._point
        bound = point if isinstance(point, int) else audit.LAST_POSITION
        after = 0
        first = True
        while True:
            rows, head = audit.audit_rows(
                self._store,
                "tenant_id = ? AND position > ? AND position <= ?",
                [str(self._tenant_id), after, bound],
                order="position",
                limit=REPLAY_PAGE,
            )
            if first:
                # Later pages stay within what the first statement saw, so one replay is
                # one consistent cut of the log even while the projection moves on.
                bound, first = min(bound, head), False
                self.position = bound
            for row in rows:
                if isinstance(point, datetime):
                    recorded_at = datetime.fromisoformat(row["recorded_at"])
                    if recorded_at > point:
                        self.position = int(row["position"]) - 1
                        return
                yield audit.decoded_event(self._tools.mapper, row), int(row["position"])
            if len(rows) < REPLAY_PAGE:
                return
            after = int(rows[-1]["position"])


async def get_dashboard_as_of(request: Request) -> Response:
    """The tenant's dashboard as it was at a log position or a time, replayed from its
    events by the dashboard projection's own code; X-Projection-Position says which
    position it reflects."""
    api, principal, tools = await audit.audit_context(request)
    audit.only_params(request, "asOf")
    point = as_of(request.query_params.get("asOf"))

    def load() -> tuple[Dashboard, int]:
        replay = _Replay(api.store, tools, principal.tenant_id, point)
        row = tools.replay_dashboard(principal.tenant_id, replay.events())
        return dashboard_of(row), replay.position

    body, position = await audit.load_audit(request, api, "getAuditDashboard", load)
    return audit.answer(body, position)


routes = [Route("/api/audit/dashboard", get_dashboard_as_of, methods=["GET"])]

operations = [
    apidoc.Operation(
        method="GET",
        path="/api/audit/dashboard",
        summary="The tenant's dashboard as it was at a log position or a time",
        operation_id="getAuditDashboard",
        roles=audit.AUDIT_ROLES,
        status=200,
        response=Dashboard,
        params=(
            apidoc.Param(
                name="asOf",
                where="query",
                required=True,
                schema={
                    "anyOf": [
                        {"type": "integer", "minimum": 0},
                        {"type": "string", "format": "date-time"},
                    ]
                },
                description="A log position (every event at or before it) or an RFC 3339 "
                "time (the log up to the first event recorded after it).",
            ),
        ),
        errors=audit.AUDIT_ERRORS,
    ),
]
