"""The OpenAPI 3.1 document at /openapi.json, assembled from the operations every route
module declares and the msgspec types that validate its requests and shape its answers.
It is built on the first request and kept, encoded, in the app's state."""

from __future__ import annotations

import http
import re
from collections.abc import Sequence
from importlib import metadata
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from commands import routes as write_routes
from infra import apidoc
from readapi import audit, dashboard, forecasts, pointintime, scenarios, usage
from service import errors, health

TITLE = "AccuBooks planning core"
_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")
_REQUEST_ID = {
    "description": "The request's id (the client's X-Request-Id when it is sane).",
    "schema": {"type": "string"},
}
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer."}},
    429: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}},
}

Liveness = Annotated[
    msgspec.Raw,
    msgspec.Meta(
        extra_json_schema={
            "type": "object",
            "properties": {"status": {"const": "ok"}},
            "required": ["status"],
        }
    ),
]
OpenApiDocument = Annotated[
    msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object", "description": "This document."})
]
MetricsText = Annotated[
    str,
    msgspec.Meta(
        description="Prometheus text exposition format: request durations, cache, shedding "
        "and timeout counters (all API processes in multi-process mode), projection lag and "
        "forecast queue depth (measured at scrape time)."
    ),
]

SERVICE_OPERATIONS = [
    apidoc.Operation(
        method="GET",
        path="/health/live",
        summary="The process is up",
        operation_id="getLiveness",
        roles=(),
        status=200,
        response=Liveness,
    ),
    apidoc.Operation(
        method="GET",
        path="/health/ready",
        summary="The service can serve: the database answers (else 503); degraded signals",
        operation_id="getReadiness",
        roles=(),
        status=200,
        response=health.Readiness,
        errors=(503,),
        response_headers=(
            apidoc.Header(
                name=health.STATUS_HEADER,
                schema={"const": "degraded"},
                description="Present while the service is degraded.",
                required=False,
            ),
            apidoc.Header(
                name=health.MESSAGE_HEADER,
                schema={"type": "string"},
                description="Why the service is degraded.",
                required=False,
            ),
        ),
    ),
    apidoc.Operation(
        method="GET",
        path="/metrics",
        summary="Prometheus metrics of the service",
        operation_id="getMetrics",
        roles=(),
        status=200,
        response=MetricsText,
        media_type="text/plain",
    ),
    apidoc.Operation(
        method="GET",
        path="/openapi.json",
        summary="This OpenAPI document",
        operation_id="getOpenApi",
        roles=(),
        status=200,
        response=OpenApiDocument,
    ),
]

OPERATIONS: tuple[apidoc.Operation, ...] = (
    *SERVICE_OPERATIONS,
    *write_routes.operations,
    *scenarios.operations,
    *forecasts.operations,
    *dashboard.operations,
    *usage.operations,
    *audit.operations,
    *pointintime.operations,
)


def document(operations: Sequence[apidoc.Operation]) -> dict[str, Any]:
    """The OpenAPI document of ``operations``; ValueError when an operation is declared
    twice or its path parameters do not match its path."""
    # One schema_components call for every type, so each component is named once.
    types: list[Any] = [errors.ErrorEnvelope]
    for op in operations:
        types.extend((op.request_body, op.response, *op.schema_types))
    schemas, components = msgspec.json.schema_components(
        [t for t in types if t is not None], ref_template=apidoc.REF_TEMPLATE
    )
    schema_of = iter(schemas)
    error_schema = next(schema_of)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        body = next(schema_of) if op.request_body is not None else None
        answer = next(schema_of) if op.response is not None else None
        for _ in op.schema_types:
            next(schema_of)
        item = paths.setdefault(op.path, {})
        method = op.method.lower()
        if method in item:
            raise ValueError(f"{op.method} {op.path} is declared twice")
        item[method] = _operation(op, body, answer, error_schema)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": metadata.version("accubooks"),
            "description": "Financial scenarios and their forecasts. Commands need a writer "
            "key and an Idempotency-Key; reads take any key.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key; it names the tenant and the role.",
                }
            },
        },
    }


def _operation(
    op: apidoc.Operation,
    body: dict[str, Any] | None,
    answer: dict[str, Any] | None,
    error_schema: dict[str, Any],
) -> dict[str, Any]:
    needs_key = bool(op.roles)
    params = list(op.params)
    headers = list(op.response_headers)
    if op.is_command:
        params.append(apidoc.IDEMPOTENCY_KEY)
        headers.extend(apidoc.COMMAND_HEADERS)
    elif needs_key:
        params.append(apidoc.READ_CONSISTENCY_TOKEN)
        headers.extend(apidoc.READ_HEADERS)
    _check_path_params(op)
    success: dict[str, Any] = {
        "description": http.HTTPStatus(op.status).phrase,
        "headers": {"X-Request-Id": _REQUEST_ID} | {h.name: _header(h) for h in headers},
    }
    if answer is not None:
        success["content"] = {op.media_type: {"schema": answer}}
    responses = {str(op.status): success}
    responses.update({str(s): _error(s, error_schema) for s in sorted(set(op.errors))})
    spec: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "description": f"Needs a key with role {' or '.join(op.roles)}."
        if needs_key
        else "Needs no key.",
        "security": [{"bearerAuth": []}] if needs_key else [],
        "parameters": [_param(p) for p in params],
        "responses": responses,
    }
    if body is not None:
        spec["requestBody"] = {
            "required": op.request_body_required,
            "content": {"application/json": {"schema": body}},
        }
    return spec


def _check_path_params(op: apidoc.Operation) -> None:
    in_path = set(_PATH_PARAM.findall(op.path))
    declared = {p.name for p in op.params if p.where == "path"}
    if in_path != declared:
        raise ValueError(f"{op.method} {op.path} declares path parameters {sorted(declared)}")


def _param(param: apidoc.Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "required": param.required or param.where == "path",
        "description": param.description,
        "schema": dict(param.schema),
    }


def _header(header: apidoc.Header) -> dict[str, Any]:
    return {
        "description": header.description,
        "required": header.required,
        "schema": dict(header.schema),
    }


def _error(status: int, error_schema: dict[str, Any]) -> dict[str, Any]:
    codes = sorted(code for code, s in errors.STATUS_BY_CODE.items() if s == status)
    return {
        "description": f"{http.HTTPStatus(status).phrase}: {', '.join(codes)}",
        "headers": {"X-Request-Id": _REQUEST_ID, **_ERROR_HEADERS.get(status, {})},
        "content": {"application/json": {"schema": error_schema}},
    }


_encoder = msgspec.json.Encoder()


async def get_openapi(request: Request) -> Response:
    state = request.app.state
    encoded: bytes | None = getattr(state, "openapi_document", None)
    if encoded is None:
        # Two first requests at once may both build it; they build the same bytes.
        encoded = _encoder.encode(document(OPERATIONS))
        state.openapi_document = encoded
    return Response(encoded, media_type="application/json")


route = Route("/openapi.json", get_openapi, methods=["GET"])
