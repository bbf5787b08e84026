"""Scenario reads: a page of the tenant's scenarios (newest first, with forecast counts)
and one scenario with its latest forecasts; each is one indexed statement."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from domain import scenario_spec as spec
from infra import apidoc
from infra.readstore import ReadStore, Row
from readapi import forecasts, paging
from readapi.context import answer, position_sql, read_context
from readapi.errors import NotFoundError

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
) -> tuple[list[Row], int, int | None]:
    keyset = " AND (created_at, id) < (?, ?)" if request.after else ""
    sql = (
        f"SELECT t.total AS total, {position_sql(store, PROJECTION)} AS position, r.*"
        " FROM (SELECT CAST(? AS TEXT) AS tenant_id) q"
        " LEFT JOIN scenarios_tenants t ON t.tenant_id = q.tenant_id"
        f" LEFT JOIN (SELECT {_COLUMNS} FROM scenarios_rows WHERE tenant_id = ?{keyset}"
        " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?) r ON 1 = 1"
        " ORDER BY r.created_at DESC, r.id DESC"
    )
    params: list[Any] = [str(tenant_id), str(tenant_id)]
    if request.after:
        params.extend(request.after)
    params.extend([request.limit + 1, request.offset])
    rows = store.query(PROJECTION, sql, params)
    total = rows[0]["total"] or 0
    position = rows[0]["position"]
    return [row for row in rows if row["id"] is not None], total, position


async def get_scenarios(request: Request) -> Response:
    api, principal = await read_context(request)
    page = paging.page_request(request.query_params, principal.tenant_id, api.signer)
    rows, total, position = await run_in_threadpool(
        list_scenarios, api.store, principal.tenant_id, page
    )
    shown = rows[: page.limit]
    more = len(rows) > page.limit
    body = ScenarioPage(
        data=[_item(row) for row in shown],
        pagination=paging.pagination(page, total),
        next_cursor=paging.next_cursor(
            api.signer, principal.tenant_id, page, shown[-1] if more else None
        ),
    )
    return answer(body, position)


def find_scenario(
    store: ReadStore, tenant_id: UUID, scenario_id: str
) -> tuple[Row | None, int | None]:
    sql = (
        f"SELECT {position_sql(store, PROJECTION)} AS position, r.*"
        " FROM (SELECT 1 AS one) q"
        f" LEFT JOIN (SELECT {_COLUMNS}, latest_forecasts FROM scenarios_rows"
        " WHERE tenant_id = ? AND id = ?) r ON 1 = 1"
    )
    [row] = store.query(PROJECTION, sql, [str(tenant_id), scenario_id])
    return (row if row["id"] is not None else None), row["position"]


async def get_scenario(request: Request) -> Response:
    api, principal = await read_context(request)
    raw_id = request.path_params["scenario_id"]
    try:
        scenario_id = str(UUID(raw_id))
    except ValueError:
        raise NotFoundError(f"scenario {raw_id} not found") from None
    row, position = await run_in_threadpool(
        find_scenario, api.store, principal.tenant_id, scenario_id
    )
    if row is None:
        raise NotFoundError(f"scenario {scenario_id} not found")
    item = _item(row)
    detail = ScenarioDetail(
        **{f: getattr(item, f) for f in item.__struct_fields__},
        latest_forecasts=msgspec.Raw(row["latest_forecasts"].encode()),
    )
    return answer(detail, position)


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
