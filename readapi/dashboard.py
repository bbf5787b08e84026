"""The tenant's dashboard: one statement on its dashboard row (zeros before any activity)."""

from __future__ import annotations

import json
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

PROJECTION = "dashboard"


class ScenarioCounts(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    total: int
    active: int
    archived: int
    by_type: dict[str, int]


class ForecastCounts(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    queued: int
    running: int
    completed: int
    failed: int


class Dashboard(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    scenarios: ScenarioCounts
    forecasts: ForecastCounts
    last_activity_at: str | None


def load_dashboard(store: ReadStore, tenant_id: UUID) -> Row:
    sql = (
        f"SELECT {position_sql(store, PROJECTION)} AS position, d.*"
        " FROM (SELECT 1 AS one) q"
        " LEFT JOIN dashboard_tenants d ON d.tenant_id = ?"
    )
    [row] = store.query(PROJECTION, sql, [str(tenant_id)])
    return row


def dashboard_of(row: Row) -> Dashboard:
    def n(column: str) -> int:
        return int(row[column] or 0)

    return Dashboard(
        scenarios=ScenarioCounts(
            total=n("scenarios_total"),
            active=n("scenarios_active"),
            archived=n("scenarios_archived"),
            by_type=json.loads(row["by_type"]) if row["by_type"] else {},
        ),
        forecasts=ForecastCounts(
            total=n("forecasts_total"),
            queued=n("forecasts_queued"),
            running=n("forecasts_running"),
            completed=n("forecasts_completed"),
            failed=n("forecasts_failed"),
        ),
        last_activity_at=row["last_activity_at"],
    )


async def get_dashboard(request: Request) -> Response:
    api, principal = await read_context(request)
    if request.query_params:
        raise QueryValidationError("the dashboard takes no query parameters")

    def load() -> tuple[Dashboard, int | None]:
        row = load_dashboard(api.store, principal.tenant_id)
        return dashboard_of(row), row["position"]

    return await serve(
        request,
        api,
        principal.tenant_id,
        projection=PROJECTION,
        operation="getDashboard",
        key=("dashboard",),
        load=load,
    )


routes = [Route("/api/dashboard", get_dashboard, methods=["GET"])]

operations = [
    apidoc.Operation(
        method="GET",
        path="/api/dashboard",
        summary="The tenant's scenario and forecast counts",
        operation_id="getDashboard",
        roles=apidoc.READ_ROLES,
        status=200,
        response=Dashboard,
        errors=apidoc.READ_ERRORS,
    )
]
