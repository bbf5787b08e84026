"""Scenario reads: a page of the tenant's scenarios (newest first, with forecast counts)
and one scenario with its latest forecasts; each is one indexed statement."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from domain import scenario_spec as spec
from infra import apidoc
from infra.readstore import ReadStore, Row
from readapi import forecasts, paging, queries
from readapi.context import read_context
from readapi.errors import NotFoundError
from readapi.serving import serve

PROJECTION = "scenarios"
_COLUMNS = (
    "id, name, type, status, version, baseline, assumptions, created_at, updated_at, forecast_count"
)


class ForecastSummary(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One of a scenario's latest forecasts as the read model stores them (documents
    ``latestForecasts``, which is served as stored)."""

    id: str
    status: forecasts.ForecastStatus
    horizon_months: int
    paths: int
    requested_at: str
    completed_at: str | None


# Stored JSON is served as is; the annotations give these fields their documented shape.
BaselineJson = Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema=apidoc.ref(spec.Baseline))]
AssumptionsJson = Annotated[
    msgspec.Raw, msgspec.Meta(extra_json_schema=apidoc.assumptions_schema())
]
LatestForecastsJson = Annotated[
    msgspec.Raw,
    msgspec.Meta(
        extra_json_schema={
            "type": "array",
            "items": apidoc.ref(ForecastSummary),
            "description": "The latest forecasts of the scenario, newest first.",
        }
    ),
]


class ScenarioItem(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    id: str
    name: str
    type: str
    status: str
    version: int
    baseline: BaselineJson
    assumptions: AssumptionsJson
    created_at: str
    updated_at: str
    forecast_count: int


class ScenarioDetail(ScenarioItem, frozen=True, kw_only=True, rename="camel"):
    latest_forecasts: LatestForecastsJson


class ScenarioPage(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    data: list[ScenarioItem]
    pagination: paging.Pagination
    next_cursor: str | None


def _item(row: Row) -> ScenarioItem:
    return ScenarioItem(
        id=row["id"],
        name=row["name"],
        type=row["type"],
        status=row["status"],
        version=row["version"],
        baseline=msgspec.Raw(row["baseline"].encode()),
        assumptions=msgspec.Raw(row["assumptions"].encode()),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        forecast_count=row["forecast_count"],
    )


def list_scenarios(
    store: ReadStore, tenant_id: UUID, request: paging.PageRequest
) -> queries.PageOfRows:
    return queries.page_of(
        store,
        PROJECTION,
        table="scenarios_rows",
        columns=_COLUMNS,
        total_sql="SELECT total FROM scenarios_tenants WHERE tenant_id = ?",
        total_params=[str(tenant_id)],
        tenant_id=tenant_id,
        equal=[],
        request=request,
    )


def load_scenario(
    store: ReadStore, tenant_id: UUID, scenario_id: str
) -> tuple[Row | None, int | None]:
    """The scenario with its latest forecasts (None when the tenant has no such one)."""
    return queries.one_of(
        store,
        PROJECTION,
        table="scenarios_rows",
        columns=f"{_COLUMNS}, latest_forecasts",
        tenant_id=tenant_id,
        row_id=scenario_id,
    )


async def get_scenarios(request: Request) -> Response:
    api, principal = await read_context(request)
    page = paging.page_request(request.query_params, principal.tenant_id, api.signer)

    def load() -> tuple[ScenarioPage, int | None]:
        found = list_scenarios(api.store, principal.tenant_id, page)
        body = ScenarioPage(
            data=[_item(row) for row in found.rows],
            pagination=paging.pagination(page, found.total),
            next_cursor=queries.next_cursor(api.signer, principal.tenant_id, page, found),
        )
        return body, found.position

    return await serve(
        request,
        api,
        principal.tenant_id,
        projection=PROJECTION,
        operation="getScenarios",
        key=("scenarios", *queries.query_key(request)),
        load=load,
    )


async def get_scenario(request: Request) -> Response:
    api, principal = await read_context(request)
    scenario_id = queries.resource_id(request, "scenario_id", "scenario")

    def load() -> tuple[ScenarioDetail, int | None]:
        row, position = load_scenario(api.store, principal.tenant_id, scenario_id)
        if row is None:
            raise NotFoundError(f"scenario {scenario_id} not found")
        item = _item(row)
        detail = ScenarioDetail(
            **{f: getattr(item, f) for f in item.__struct_fields__},
            latest_forecasts=msgspec.Raw(row["latest_forecasts"].encode()),
        )
        return detail, position

    return await serve(
        request,
        api,
        principal.tenant_id,
        projection=PROJECTION,
        operation="getScenario",
        key=("scenario", scenario_id),
        load=load,
    )


routes = [
    Route("/api/scenarios", get_scenarios, methods=["GET"]),
    Route("/api/scenarios/{scenario_id}", get_scenario, methods=["GET"]),
]

_SCHEMA_TYPES = (spec.Baseline, ForecastSummary)

operations = [
    apidoc.Operation(
        method="GET",
        path="/api/scenarios",
        summary="List the tenant's scenarios, newest first",
        operation_id="getScenarios",
        roles=apidoc.READ_ROLES,
        status=200,
        response=ScenarioPage,
        params=apidoc.paging_params(default_limit=paging.DEFAULT_LIMIT, max_limit=paging.MAX_LIMIT),
        errors=apidoc.READ_ERRORS,
        schema_types=_SCHEMA_TYPES,
    ),
    apidoc.Operation(
        method="GET",
        path="/api/scenarios/{scenario_id}",
        summary="Read a scenario with its latest forecasts",
        operation_id="getScenario",
        roles=apidoc.READ_ROLES,
        status=200,
        response=ScenarioDetail,
        params=(apidoc.uuid_path("scenario_id", "The scenario's id."),),
        errors=(*apidoc.READ_ERRORS, 404),
        schema_types=_SCHEMA_TYPES,
    ),
]
