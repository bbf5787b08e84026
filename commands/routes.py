"""The write routes of API.md: authenticate a writer, read the Idempotency-Key and the
body, then hand the command to its handler on a worker thread (the event store is sync)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from uuid import UUID

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from commands import forecasts, messages, scenarios, views
from commands.context import Collaborators, CommandContext, checked_idempotency_key
from commands.errors import NotFoundError
from commands.idempotency import Reply
from domain.events import Actor
from infra import apidoc, auth, wire
from infra.errors import RequestValidationError

_VERSION = r'(?:W/)?"?([0-9]{1,9})"?'
_IF_MATCH = re.compile(rf"^{_VERSION}$")


@dataclass(frozen=True)
class WriteApi:
    """What the write routes need, put into the app state by the composition root."""

    deps: Collaborators
    max_body_bytes: int


async def _context(request: Request) -> tuple[WriteApi, CommandContext]:
    api: WriteApi = request.state.write_api
    principal = await auth.principal_of(request)
    auth.require_role(principal, "writer")
    key = checked_idempotency_key(request.headers.get("idempotency-key"))
    actor = Actor(
        tenant_id=principal.tenant_id,
        actor_id=str(principal.key_id),
        request_id=wire.request_id_of(request),
    )
    return api, CommandContext(actor=actor, idempotency_key=key)


def _scenario_id(request: Request) -> UUID:
    raw = request.path_params["scenario_id"]
    try:
        return UUID(raw)
    except ValueError:
        raise NotFoundError(f"scenario {raw} not found") from None


def _if_match(request: Request) -> int | None:
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    match = _IF_MATCH.match(value.strip())
    if match is None:
        raise RequestValidationError(
            'If-Match must be a scenario version, like 3 or "3"',
            details=[wire.detail("/headers/If-Match", "expected a version number")],
        )
    return int(match.group(1))


def _response(reply: Reply) -> Response:
    return Response(
        reply.body, status_code=reply.status, headers=reply.headers, media_type="application/json"
    )


async def create_scenario(request: Request) -> Response:
    api, ctx = await _context(request)
    raw = await wire.read_body(request, max_bytes=api.max_body_bytes)
    body = wire.decode(raw, messages.CreateScenarioBody)
    # With group commit the common case needs no worker thread: it reads nothing, and
    # its save is awaited while the committer thread writes.
    reply = (
        await scenarios.try_create_scenario(api.deps, ctx, body)
        if api.deps.log.groups_commits
        else None
    )
    if reply is None:
        reply = await run_in_threadpool(scenarios.create_scenario, api.deps, ctx, body)
    return _response(reply)


async def update_scenario(request: Request) -> Response:
    api, ctx = await _context(request)
    scenario_id = _scenario_id(request)
    if_match = _if_match(request)
    raw = await wire.read_body(request, max_bytes=api.max_body_bytes)
    body = wire.decode(raw, messages.UpdateScenarioBody)
    reply = await run_in_threadpool(
        scenarios.update_scenario, api.deps, ctx, scenario_id, body, if_match
    )
    return _response(reply)


async def archive_scenario(request: Request) -> Response:
    api, ctx = await _context(request)
    scenario_id = _scenario_id(request)
    raw = await wire.read_body(request, max_bytes=api.max_body_bytes, empty_ok=True)
    wire.decode(raw, messages.ArchiveScenarioBody)
    reply = await run_in_threadpool(scenarios.archive_scenario, api.deps, ctx, scenario_id)
    return _response(reply)


async def generate_forecast(request: Request) -> Response:
    api, ctx = await _context(request)
    raw = await wire.read_body(request, max_bytes=api.max_body_bytes)
    body = wire.decode(raw, messages.GenerateForecastBody)
    return _response(await run_in_threadpool(forecasts.request_forecast, api.deps, ctx, body))


routes = [
    Route("/api/scenarios", create_scenario, methods=["POST"]),
    Route("/api/scenarios/{scenario_id}", update_scenario, methods=["PATCH"]),
    Route("/api/scenarios/{scenario_id}/archive", archive_scenario, methods=["POST"]),
    Route("/api/forecasts/generate", generate_forecast, methods=["POST"]),
]

_SCENARIO_ID = apidoc.uuid_path("scenario_id", "The scenario's id.")
_IF_MATCH_PARAM = apidoc.Param(
    name="If-Match",
    where="header",
    schema={"type": "string", "pattern": rf"^\s*(?:\*|{_VERSION})\s*$"},
    description='The version the change is based on (3 or "3"); a stale one is 409.',
)
_ETAG = apidoc.Header(
    name="ETag",
    schema={"type": "string", "pattern": '^"[0-9]+"$'},
    description="The scenario's version, for If-Match.",
)
_LOCATION = apidoc.Header(
    name="Location", schema={"type": "string"}, description="Where the resource can be read."
)

operations = [
    apidoc.Operation(
        method="POST",
        path="/api/scenarios",
        summary="Create a scenario",
        operation_id="createScenario",
        roles=apidoc.WRITE_ROLES,
        status=201,
        request_body=messages.CreateScenarioBody,
        response=views.ScenarioView,
        is_command=True,
        errors=apidoc.COMMAND_ERRORS,
        response_headers=(_ETAG, _LOCATION),
    ),
    apidoc.Operation(
        method="PATCH",
        path="/api/scenarios/{scenario_id}",
        summary="Change a scenario's name, baseline or assumptions",
        operation_id="updateScenario",
        roles=apidoc.WRITE_ROLES,
        status=200,
        request_body=messages.UpdateScenarioBody,
        response=views.ScenarioView,
        is_command=True,
        params=(_SCENARIO_ID, _IF_MATCH_PARAM),
        errors=(*apidoc.COMMAND_ERRORS, 404),
        response_headers=(_ETAG,),
    ),
    apidoc.Operation(
        method="POST",
        path="/api/scenarios/{scenario_id}/archive",
        summary="Archive a scenario",
        operation_id="archiveScenario",
        roles=apidoc.WRITE_ROLES,
        status=200,
        request_body=messages.ArchiveScenarioBody,
        request_body_required=False,
        response=views.ScenarioView,
        is_command=True,
        params=(_SCENARIO_ID,),
        errors=(*apidoc.COMMAND_ERRORS, 404),
        response_headers=(_ETAG,),
    ),
    apidoc.Operation(
        method="POST",
        path="/api/forecasts/generate",
        summary="Queue a forecast of a scenario",
        operation_id="generateForecast",
        roles=apidoc.WRITE_ROLES,
        status=202,
        request_body=messages.GenerateForecastBody,
        response=views.ForecastAccepted,
        is_command=True,
        errors=(*apidoc.COMMAND_ERRORS, 404),
        response_headers=(_LOCATION,),
    ),
]
