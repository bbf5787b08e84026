"""Forecast reads: a page of the tenant's forecasts (filters scenarioId and status, newest
first, each with its scenario's id, name and type) and one forecast with its result;
each is one indexed statement."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from domain import forecast_model
from infra import apidoc
from infra.readstore import ReadStore, Row
from readapi import paging, queries
from readapi.context import read_context
from readapi.errors import NotFoundError, QueryValidationError
from readapi.serving import serve

PROJECTION = "forecasts"
STATUSES: Final = ("queued", "running", "completed", "failed")
ForecastStatus = Literal["queued", "running", "completed", "failed"]
_COLUMNS = (
    "id, scenario_id, scenario_name, scenario_type, status, horizon_months, paths,"
    " created_at, completed_at, failure_reason"
)


class ScenarioRef(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    type: str


class ForecastItem(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    id: str
    scenario_id: str
    scenario: ScenarioRef
    status: ForecastStatus
    horizon_months: int
    paths: int
    requested_at: str
    completed_at: str | None
    failure_reason: str | None


# Stored JSON is served as is; the annotation gives it its documented shape.
ResultJson = Annotated[
    msgspec.Raw, msgspec.Meta(extra_json_schema=apidoc.ref(forecast_model.ForecastResult))
]


class ForecastDetail(ForecastItem, frozen=True, kw_only=True, rename="camel"):
    # Null until the forecast completes.
    result: ResultJson | None


class ForecastPage(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    data: list[ForecastItem]
    pagination: paging.Pagination
    next_cursor: str | None


def _fields(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "scenario_id": row["scenario_id"],
        "scenario": ScenarioRef(
            id=row["scenario_id"], name=row["scenario_name"], type=row["scenario_type"]
        ),
        "status": row["status"],
        "horizon_months": row["horizon_months"],
        "paths": row["paths"],
        "requested_at": row["created_at"],
        "completed_at": row["completed_at"],
        "failure_reason": row["failure_reason"],
    }


def _filters(params: Any) -> dict[str, str]:
    filters: dict[str, str] = {}
    if "scenarioId" in params:
        try:
            filters["scenarioId"] = str(UUID(params["scenarioId"]))
        except ValueError:
            raise QueryValidationError("`scenarioId` must be a UUID") from None
    if "status" in params:
        if params["status"] not in STATUSES:
            raise QueryValidationError(f"`status` must be one of {', '.join(STATUSES)}")
        filters["status"] = params["status"]
    return filters


def list_forecasts(
    store: ReadStore, tenant_id: UUID, request: paging.PageRequest
) -> queries.PageOfRows:
    scenario_id = request.filters.get("scenarioId")
    status = request.filters.get("status")
    equal = [("scenario_id", scenario_id)] if scenario_id else []
    equal += [("status", status)] if status else []
    return queries.page_of(
        store,
        PROJECTION,
        table="forecasts_rows",
        columns=_COLUMNS,
        # The counter row of exactly these filters ("" stands for any).
        total_sql="SELECT n FROM forecasts_counts"
        " WHERE tenant_id = ? AND scenario_id = ? AND status = ?",
        total_params=[str(tenant_id), scenario_id or "", status or ""],
        tenant_id=tenant_id,
        equal=equal,
        request=request,
    )


def load_forecast(
    store: ReadStore, tenant_id: UUID, forecast_id: str
) -> tuple[Row | None, int | None]:
    """The forecast with its result (None when the tenant has no such one)."""
    return queries.one_of(
        store,
        PROJECTION,
        table="forecasts_rows",
        columns=f"{_COLUMNS}, result",
        tenant_id=tenant_id,
        row_id=forecast_id,
    )


async def get_forecasts(request: Request) -> Response:
    api, principal = await read_context(request)
    page = paging.page_request(
        request.query_params,
        principal.tenant_id,
        api.signer,
        filters=_filters(request.query_params),
        allowed=frozenset({"scenarioId", "status"}),
    )

    def load() -> tuple[ForecastPage, int | None]:
        found = list_forecasts(api.store, principal.tenant_id, page)
        body = ForecastPage(
            data=[ForecastItem(**_fields(row)) for row in found.rows],
            pagination=paging.pagination(page, found.total),
            next_cursor=queries.next_cursor(api.signer, principal.tenant_id, page, found),
        )
        return body, found.position

    return await serve(
        request,
        api,
        principal.tenant_id,
        projection=PROJECTION,
        operation="getForecasts",
        key=("forecasts", *queries.query_key(request)),
        load=load,
    )


async def get_forecast(request: Request) -> Response:
    api, principal = await read_context(request)
    forecast_id = queries.resource_id(request, "forecast_id", "forecast")

    def load() -> tuple[ForecastDetail, int | None]:
        row, position = load_forecast(api.store, principal.tenant_id, forecast_id)
        if row is None:
            raise NotFoundError(f"forecast {forecast_id} not found")
        result = msgspec.Raw(row["result"].encode()) if row["result"] else None
        return ForecastDetail(**_fields(row), result=result), position

    return await serve(
        request,
        api,
        principal.tenant_id,
        projection=PROJECTION,
        operation="getForecast",
        key=("forecast", forecast_id),
        load=load,
    )


routes = [
    Route("/api/forecasts", get_forecasts, methods=["GET"]),
    Route("/api/forecasts/{forecast_id}", get_forecast, methods=["GET"]),
]

operations = [
    apidoc.Operation(
        method="GET",
        path="/api/forecasts",
        summary="List the tenant's forecasts, newest first",
        operation_id="getForecasts",
        roles=apidoc.READ_ROLES,
        status=200,
        response=ForecastPage,
        params=(
            *apidoc.paging_params(default_limit=paging.DEFAULT_LIMIT, max_limit=paging.MAX_LIMIT),
            apidoc.Param(
                name="scenarioId",
                where="query",
                schema={"type": "string", "format": "uuid"},
                description="Only this scenario's forecasts.",
            ),
            apidoc.Param(
                name="status",
                where="query",
                schema={"enum": list(STATUSES)},
                description="Only forecasts with this status.",
            ),
        ),
        errors=apidoc.READ_ERRORS,
    ),
    apidoc.Operation(
        method="GET",
        path="/api/forecasts/{forecast_id}",
        summary="Read a forecast with its result once completed",
        operation_id="getForecast",
        roles=apidoc.READ_ROLES,
        status=200,
        response=ForecastDetail,
        params=(apidoc.uuid_path("forecast_id", "The forecast's id."),),
        errors=(*apidoc.READ_ERRORS, 404),
        schema_types=(forecast_model.ForecastResult,),
    ),
]
