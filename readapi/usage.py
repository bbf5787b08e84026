"""The tenant's usage for one calendar month (UTC; default: the current month)."""

from __future__ import annotations

import re
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from infra import apidoc
from infra.readstore import ReadStore, Row
from readapi.context import position_sql, read_context
from readapi.errors import QueryValidationError
from readapi.serving import serve

PROJECTION = "usage"
_MONTH = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")


class Usage(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    month: str
    scenarios_created: int
    forecasts_requested: int
    forecasts_completed: int
    compute_seconds: float
    commands_accepted: int
    events_appended: int


def load_usage(store: ReadStore, tenant_id: UUID, month: str) -> Row:
    sql = (
        f"SELECT {position_sql(store, PROJECTION)} AS position, u.*"
        " FROM (SELECT 1 AS one) q"
        " LEFT JOIN usage_months u ON u.tenant_id = ? AND u.month = ?"
    )
    [row] = store.query(PROJECTION, sql, [str(tenant_id), month])
    return row


async def get_usage(request: Request) -> Response:
    api, principal = await read_context(request)
    unknown = set(request.query_params) - {"month"}
    if unknown:
        raise QueryValidationError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    month = request.query_params.get("month") or api.clock().strftime("%Y-%m")
    if not _MONTH.match(month):
        raise QueryValidationError("`month` must be YYYY-MM")

    def load() -> tuple[Usage, int | None]:
        row = load_usage(api.store, principal.tenant_id, month)
        body = Usage(
            month=month,
            scenarios_created=int(row["scenarios_created"] or 0),
            forecasts_requested=int(row["forecasts_requested"] or 0),
            forecasts_completed=int(row["forecasts_completed"] or 0),
            compute_seconds=round(float(row["compute_seconds"] or 0.0), 3),
            commands_accepted=int(row["commands_accepted"] or 0),
            events_appended=int(row["events_appended"] or 0),
        )
        return body, row["position"]

    return await serve(
        request,
        api,
        principal.tenant_id,
        projection=PROJECTION,
        operation="getUsage",
        key=("usage", month),
        load=load,
    )


routes = [Route("/api/usage", get_usage, methods=["GET"])]

operations = [
    apidoc.Operation(
        method="GET",
        path="/api/usage",
        summary="The tenant's usage in one calendar month",
        operation_id="getUsage",
        roles=apidoc.READ_ROLES,
        status=200,
        response=Usage,
        params=(
            apidoc.Param(
                name="month",
                where="query",
                schema={"type": "string", "pattern": _MONTH.pattern},
                description="YYYY-MM (UTC); default: the current month.",
            ),
        ),
        errors=apidoc.READ_ERRORS,
    )
]
