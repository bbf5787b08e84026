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

from commands import forecasts, messages, scenarios
from commands.context import Collaborators, CommandContext, checked_idempotency_key
from commands.errors import NotFoundError
from commands.idempotency import Reply
from domain.events import Actor
from infra import auth, wire
from infra.errors import RequestValidationError

_IF_MATCH = re.compile(r'^(?:W/)?"?([0-9]{1,9})"?$')


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
    return _response(await run_in_threadpool(scenarios.create_scenario, api.deps, ctx, body))


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
