"""Audit reads (auditor keys only): the tenant's event log paged by position, one
aggregate's history, and the signed head of the tenant's hash chain with the key that
signs it (the dashboard as it was: readapi.pointintime). Every answer comes from the
audit read model (projections.audit) in the tenant's scope, never from the read cache: an
auditor always reads the store as it is, and X-Consistency-Token is honoured as on every
read."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

import msgspec
from eventsourcing.persistence import Mapper, StoredEvent
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from domain import api_key, audit
from infra import apidoc, auth, signing
from infra.errors import OperationTimeoutError
from infra.readstore import ReadStore, Row
from readapi import queries
from readapi.consistency import wait_for_token
from readapi.context import POSITION_HEADER, AuditTools, ReadApi, position_sql
from readapi.errors import NotFoundError, QueryValidationError

PROJECTION = "audit"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Positions are BIGINT notification ids (checked against LAST_POSITION after this).
POSITION = re.compile(r"[0-9]{1,19}")
LAST_POSITION = 2**63 - 1
_COLUMNS = "position, aggregate_id, version, topic, recorded_at, actor_id, request_id, state"
# What the event's stored record already says (aggregateId, version, type): not repeated
# in its payload.
_ORIGINATOR_FIELDS = frozenset({"originator_id", "originator_version", "originator_topic"})
AUDIT_ROLES: tuple[api_key.Role, ...] = ("auditor",)
AUDIT_ERRORS = (400, 401, 403, 503)

T = TypeVar("T")


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    position: int
    aggregate_id: str
    version: int
    # The event's pinned topic (e.g. accubooks:Scenario.Created).
    type: str
    recorded_at: str
    # The acting key's id ("operator" for the CLI's commands).
    actor: str | None
    request_id: str | None
    # The event's own fields under their stored names, decoded from the stored bytes.
    payload: dict[str, Any]
    # The tenant's chain value after this event (domain.audit).
    chain_hash: str


class AuditPage(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    data: list[AuditEvent]
    # The last position of this page when more events follow (send it as `after`).
    next_after: int | None


class AggregateHistory(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    aggregate_id: str
    data: list[AuditEvent]


class PublicKey(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    algorithm: str
    key_id: str
    # Base64 of the raw 32-byte Ed25519 public key.
    public_key: str


_encoder = msgspec.json.Encoder()


async def audit_context(request: Request) -> tuple[ReadApi, auth.Principal, AuditTools]:
    """The read API, the caller (an auditor key, else 403) and the audit tools."""
    api: ReadApi = request.state.read_api
    principal = await auth.principal_of(request)
    auth.require_role(principal, *AUDIT_ROLES)
    if api.audit is None:
        raise RuntimeError("the composition root gave the read API no audit tools")
    return api, principal, api.audit


def answer(body: msgspec.Struct, position: int | None) -> Response:
    """The JSON answer with the log position it reflects; never cached."""
    return Response(
        _encoder.encode(body),
        media_type="application/json",
        headers={POSITION_HEADER: str(int(position or 0))},
    )


async def load_audit(request: Request, api: ReadApi, operation: str, load: Callable[[], T]) -> T:
    """Waits for the request's X-Consistency-Token, then runs ``load`` (blocking) in the
    threadpool under the statement budget; a timeout names the operation."""
    await wait_for_token(request, api, PROJECTION)
    try:
        return await run_in_threadpool(load)
    except OperationTimeoutError as e:
        e.operation = e.operation or operation
        raise


def only_params(request: Request, *allowed: str) -> None:
    unknown = set(request.query_params) - set(allowed)
    if unknown:
        raise QueryValidationError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")


def _integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not POSITION.fullmatch(raw) or not low <= int(raw) <= high:
        raise QueryValidationError(f"`{name}` must be an integer from {low} to {high}")
    return int(raw)


def decoded_event(mapper: Mapper[UUID], row: Row) -> Any:
    """The domain event of an audit row, decoded from its stored bytes."""
    stored = StoredEvent(
        originator_id=UUID(row["aggregate_id"]),
        originator_version=int(row["version"]),
        topic=row["topic"],
        state=bytes(row["state"]),
    )
    return mapper.to_domain_event(stored)


def _item(tools: AuditTools, row: Row) -> AuditEvent:
    fields = vars(decoded_event(tools.mapper, row))
    payload = {k: v for k, v in fields.items() if k not in _ORIGINATOR_FIELDS}
    return AuditEvent(
        position=int(row["position"]),
        aggregate_id=row["aggregate_id"],
        version=int(row["version"]),
        type=row["topic"],
        recorded_at=row["recorded_at"],
        actor=row["actor_id"],
        request_id=row["request_id"],
        payload=msgspec.to_builtins(payload),
        chain_hash=row["chain_hash"],
    )


def audit_rows(
    store: ReadStore, where: str, params: list[Any], *, order: str, limit: int | None
) -> tuple[list[Row], int]:
    """The audit rows matching ``where`` (which names the tenant) in ``order``, with the
    projection's position, in one statement: the position is read with the rows, so it
    is the one they reflect."""
    sql = (
        f"SELECT {position_sql(store, PROJECTION)} AS head, e.* FROM (SELECT 1 AS one) q"
        f" LEFT JOIN (SELECT {_COLUMNS}, chain_hash FROM audit_events WHERE {where}"
        f" ORDER BY {order}{' LIMIT ?' if limit is not None else ''}) e ON 1 = 1"
        f" ORDER BY e.{order}"
    )
    rows = store.query(PROJECTION, sql, [*params, *([] if limit is None else [limit])])
    return [row for row in rows if row["position"] is not None], int(rows[0]["head"] or 0)


async def get_audit_events(request: Request) -> Response:
    """The tenant's events in log order, after position `after` (exclusive), `limit` per
    page. Positions are the log's, so they have gaps: other tenants' events sit between a
    tenant's, and a sequence number taken by a transaction that rolled back is never used.
    Page with `after=<nextAfter>` until nextAfter is null; each page is one indexed
    statement, as cheap deep in the log as at its start."""
    api, principal, tools = await audit_context(request)
    only_params(request, "after", "limit")
    after = _integer(request, "after", 0, 0, LAST_POSITION)
    limit = _integer(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)

    def load() -> tuple[AuditPage, int]:
        rows, head = audit_rows(
            api.store,
            "tenant_id = ? AND position > ?",
            [str(principal.tenant_id), after],
            order="position",
            limit=limit + 1,
        )
        page = rows[:limit]
        more = len(rows) > limit
        body = AuditPage(
            data=[_item(tools, row) for row in page],
            next_after=int(page[-1]["position"]) if more else None,
        )
        return body, head

    body, head = await load_audit(request, api, "getAuditEvents", load)
    return answer(body, head)


async def get_aggregate_events(request: Request) -> Response:
    """Every event of one of the tenant's aggregates, oldest first."""
    api, principal, tools = await audit_context(request)
    only_params(request)
    aggregate_id = queries.resource_id(request, "aggregate_id", "aggregate")

    def load() -> tuple[AggregateHistory, int]:
        rows, head = audit_rows(
            api.store,
            "tenant_id = ? AND aggregate_id = ?",
            [str(principal.tenant_id), aggregate_id],
            order="version",
            limit=None,
        )
        if not rows:
            raise NotFoundError(f"aggregate {aggregate_id} not found")
        return AggregateHistory(
            aggregate_id=aggregate_id, data=[_item(tools, row) for row in rows]
        ), head

    body, head = await load_audit(request, api, "getAggregateEvents", load)
    return answer(body, head)


async def get_checkpoint(request: Request) -> Response:
    """The head of the tenant's hash chain, signed (domain.audit.Checkpoint); a tenant
    with no events yet is at position 0 with the genesis value."""
    api, principal, tools = await audit_context(request)
    only_params(request)

    def load() -> tuple[audit.Checkpoint, int]:
        sql = (
            f"SELECT {position_sql(api.store, PROJECTION)} AS head,"
            " h.position, h.chain_hash, h.event_count FROM (SELECT 1 AS one) q"
            " LEFT JOIN audit_heads h ON h.tenant_id = ?"
        )
        [row] = api.store.query(PROJECTION, sql, [str(principal.tenant_id)])
        unsigned = audit.Checkpoint(
            tenant_id=str(principal.tenant_id),
            position=int(row["position"] or 0),
            chain_hash=row["chain_hash"] or audit.GENESIS,
            event_count=int(row["event_count"] or 0),
            algorithm=signing.ALGORITHM,
            key_id=tools.signer.key_id,
        )
        signed = msgspec.structs.replace(unsigned, signature=tools.signer.sign(unsigned.message()))
        return signed, int(row["head"] or 0)

    body, head = await load_audit(request, api, "getAuditCheckpoint", load)
    return answer(body, head)


async def get_public_key(request: Request) -> Response:
    """The public key that checks checkpoint signatures, for any Ed25519 tool."""
    api, _, tools = await audit_context(request)
    only_params(request)
    [row] = await load_audit(
        request,
        api,
        "getAuditPublicKey",
        lambda: api.store.query(
            PROJECTION, f"SELECT {position_sql(api.store, PROJECTION)} AS head"
        ),
    )
    body = PublicKey(
        algorithm=signing.ALGORITHM,
        key_id=tools.signer.key_id,
        public_key=tools.signer.public_key,
    )
    return answer(body, row["head"])


routes = [
    Route("/api/audit/events", get_audit_events, methods=["GET"]),
    Route("/api/audit/aggregates/{aggregate_id}/events", get_aggregate_events, methods=["GET"]),
    Route("/api/audit/checkpoint", get_checkpoint, methods=["GET"]),
    Route("/api/audit/public-key", get_public_key, methods=["GET"]),
]

operations = [
    apidoc.Operation(
        method="GET",
        path="/api/audit/events",
        summary="The tenant's events in log order, paged by position (positions have gaps)",
        operation_id="getAuditEvents",
        roles=AUDIT_ROLES,
        status=200,
        response=AuditPage,
        params=(
            apidoc.Param(
                name="after",
                where="query",
                schema={"type": "integer", "minimum": 0, "default": 0},
                description="Only events after this log position (exclusive): the previous "
                "page's nextAfter.",
            ),
            apidoc.Param(
                name="limit",
                where="query",
                schema={
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIMIT,
                    "default": DEFAULT_LIMIT,
                },
                description="Events per page.",
            ),
        ),
        errors=AUDIT_ERRORS,
    ),
    apidoc.Operation(
        method="GET",
        path="/api/audit/aggregates/{aggregate_id}/events",
        summary="Every event of one of the tenant's aggregates, oldest first",
        operation_id="getAggregateEvents",
        roles=AUDIT_ROLES,
        status=200,
        response=AggregateHistory,
        params=(apidoc.uuid_path("aggregate_id", "The aggregate's id."),),
        errors=(*AUDIT_ERRORS, 404),
    ),
    apidoc.Operation(
        method="GET",
        path="/api/audit/checkpoint",
        summary="The signed head of the tenant's hash chain",
        operation_id="getAuditCheckpoint",
        roles=AUDIT_ROLES,
        status=200,
        response=audit.Checkpoint,
        errors=AUDIT_ERRORS,
    ),
    apidoc.Operation(
        method="GET",
        path="/api/audit/public-key",
        summary="The Ed25519 public key that signs checkpoints",
        operation_id="getAuditPublicKey",
        roles=AUDIT_ROLES,
        status=200,
        response=PublicKey,
        errors=AUDIT_ERRORS,
    ),
]
