"""How route modules declare their operations for the OpenAPI document: one ``Operation``
per route and method, naming the msgspec types that validate its body and shape its answer,
plus the parameters, headers and schema fragments that several packages share. The service
assembles the document from these declarations; nothing here touches a request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from domain import api_key
from domain import scenario_spec as spec

REF_TEMPLATE = "#/components/schemas/{name}"

WRITE_ROLES: tuple[api_key.Role, ...] = ("writer",)
READ_ROLES: tuple[api_key.Role, ...] = api_key.ROLES
# Statuses every command can answer: validation and idempotency-key errors, auth, a key in
# flight, body size and media type, a reused key or business rule, backpressure.
COMMAND_ERRORS = (400, 401, 403, 409, 413, 415, 422, 503)
# Every role may read, so reads never answer 403.
READ_ERRORS = (400, 401, 503)


@dataclass(frozen=True, kw_only=True)
class Param:
    """A path, query or request header parameter."""

    name: str
    where: Literal["path", "query", "header"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True, kw_only=True)
class Header:
    """A response header of a successful answer."""

    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = True


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One route and method as the OpenAPI document shows it.

    ``roles`` empty means no key is needed. A command (``is_command``) also takes the
    Idempotency-Key header and answers X-Consistency-Token; any other operation that needs a
    key is a read, which takes X-Consistency-Token and answers X-Projection-Position.
    ``request_body`` and ``response`` are the msgspec types the route decodes and encodes;
    ``schema_types`` are further types whose components annotated ``msgspec.Raw`` fields
    refer to by name.
    """

    method: Literal["GET", "POST", "PATCH", "PUT", "DELETE"]
    path: str
    summary: str
    operation_id: str
    roles: tuple[api_key.Role, ...]
    status: int
    request_body: Any = None
    request_body_required: bool = True
    response: Any = None
    media_type: str = "application/json"
    is_command: bool = False
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    response_headers: tuple[Header, ...] = ()
    schema_types: tuple[Any, ...] = ()


_TOKEN = {"type": "string", "pattern": "^[0-9]+$"}

IDEMPOTENCY_KEY = Param(
    name="Idempotency-Key",
    where="header",
    required=True,
    # The rule commands.context enforces: 1-255 printable ASCII, not only spaces.
    schema={
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": r"^[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*$",
    },
    description="Makes the command exactly-once: a retry with the same key and body gets the "
    "stored answer (with Idempotent-Replayed: true); the same key with another body is 422.",
)
READ_CONSISTENCY_TOKEN = Param(
    name="X-Consistency-Token",
    where="header",
    schema=_TOKEN,
    description="A command's X-Consistency-Token: answer only with data at or past it, "
    "waiting a bounded time (then 503 OPERATION_TIMEOUT).",
)
COMMAND_HEADERS = (
    Header(
        name="X-Consistency-Token",
        schema=_TOKEN,
        description="The log position of the command's last event; send it on a read to read "
        "this write.",
    ),
    Header(
        name="Idempotent-Replayed",
        schema={"const": "true"},
        description="Present when this is the stored answer to an earlier request with the "
        "same Idempotency-Key.",
        required=False,
    ),
)
READ_HEADERS = (
    Header(
        name="X-Projection-Position",
        schema=_TOKEN,
        description="The log position the answer reflects.",
    ),
)


def ref(kind: type) -> dict[str, Any]:
    """A reference to the component msgspec names after ``kind``; an operation that uses it
    lists ``kind`` in its ``schema_types`` so that the component is in the document."""
    return {"$ref": REF_TEMPLATE.format(name=kind.__name__)}


def uuid_path(name: str, description: str) -> Param:
    return Param(
        name=name,
        where="path",
        required=True,
        schema={"type": "string", "format": "uuid"},
        description=description,
    )


def paging_params(*, default_limit: int, max_limit: int) -> tuple[Param, ...]:
    return (
        Param(
            name="page",
            where="query",
            schema={"type": "integer", "minimum": 1, "default": 1},
            description="The page, from 1; not together with cursor.",
        ),
        Param(
            name="limit",
            where="query",
            schema={
                "type": "integer",
                "minimum": 1,
                "maximum": max_limit,
                "default": default_limit,
            },
            description="Items per page.",
        ),
        Param(
            name="cursor",
            where="query",
            schema={"type": "string"},
            description="The nextCursor of the previous answer: continues after it by keyset.",
        ),
    )


def assumptions_schema() -> dict[str, Any]:
    """The assumptions object as the API shows it: the fields of one scenario type, which is
    named by the scenario's ``type`` rather than by a tag inside the object."""
    _, components = msgspec.json.schema_components(
        spec.ASSUMPTIONS_BY_TYPE.values(), ref_template=REF_TEMPLATE
    )
    variants: list[dict[str, Any]] = []
    for scenario_type, kind in spec.ASSUMPTIONS_BY_TYPE.items():
        tag = kind.__struct_config__.tag_field
        schema = dict(components[kind.__name__])
        schema["title"] = f"{scenario_type} assumptions"
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k != tag}
        schema["required"] = [name for name in schema["required"] if name != tag]
        variants.append(schema)
    return {
        "description": "The fields of the scenario's type, plus startOffsetMonths.",
        "anyOf": variants,
    }
