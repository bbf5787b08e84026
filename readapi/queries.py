"""The two statement shapes every resource read uses, each one statement whatever the
tenant's size: a page of a tenant's rows (newest first, keyset or offset) with its total
from a counter row, and one row by id; both carry the projection's position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from starlette.requests import Request

from infra.readstore import ReadStore, Row
from readapi import paging
from readapi.context import position_sql
from readapi.errors import NotFoundError


@dataclass(frozen=True)
class PageOfRows:
    rows: list[Row]
    total: int
    position: int | None
    # Whether rows follow this page (then its last row is where a cursor continues).
    more: bool


def page_of(
    store: ReadStore,
    projection: str,
    *,
    table: str,
    columns: str,
    total_sql: str,
    total_params: Sequence[Any],
    tenant_id: UUID,
    equal: Sequence[tuple[str, str]],
    request: paging.PageRequest,
) -> PageOfRows:
    """Rows of ``table`` for the tenant where each (column, value) of ``equal`` holds.

    The first page and keyset pages read their rows straight off the (tenant, created_at,
    id) index: limit + 1 rows whatever the tenant's size. A page-number page must skip its
    offset, which costs O(offset) by nature; it skips in the index alone (its keys name
    the rows: an index-only scan, no table row read) and then reads only its own rows."""
    where = "tenant_id = ?" + "".join(f" AND {column} = ?" for column, _ in equal)
    params: list[Any] = [*total_params, str(tenant_id), *(value for _, value in equal)]
    if request.after:
        where += " AND (created_at, id) < (?, ?)"
        params.extend(request.after)
    params.extend([request.limit + 1, request.offset])
    keys = f"{table} WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
    if request.offset:
        params.insert(len(total_params), str(tenant_id))
        # PostgreSQL: the ids as an array built once, then primary-key lookups, in every
        # plan; with `IN (subquery)` a prepared statement's generic plan (LIMIT unknown)
        # hashes the ids and scans all of the tenant's rows for them instead.
        ids = (
            f"= ANY(ARRAY(SELECT id FROM {keys}))"
            if store.postgres
            else f"IN (SELECT id FROM {keys})"
        )
        page = f"SELECT {columns} FROM {table} WHERE tenant_id = ? AND id {ids}"
    else:
        page = f"SELECT {columns} FROM {keys}"
    sql = (
        f"SELECT ({total_sql}) AS total, {position_sql(store, projection)} AS position, r.*"
        f" FROM (SELECT 1 AS one) q LEFT JOIN ({page}) r ON 1 = 1"
        " ORDER BY r.created_at DESC, r.id DESC"
    )
    rows = store.query(projection, sql, params)
    found = [row for row in rows if row["id"] is not None]
    return PageOfRows(
        rows=found[: request.limit],
        total=rows[0]["total"] or 0,
        position=rows[0]["position"],
        more=len(found) > request.limit,
    )


def one_of(
    store: ReadStore, projection: str, *, table: str, columns: str, tenant_id: UUID, row_id: str
) -> tuple[Row | None, int | None]:
    """The tenant's row with this id (None for a missing or another tenant's one)."""
    sql = (
        f"SELECT {position_sql(store, projection)} AS position, r.*"
        " FROM (SELECT 1 AS one) q"
        f" LEFT JOIN (SELECT {columns} FROM {table} WHERE tenant_id = ? AND id = ?) r ON 1 = 1"
    )
    [row] = store.query(projection, sql, [str(tenant_id), row_id])
    return (row if row["id"] is not None else None), row["position"]


def resource_id(request: Request, param: str, noun: str) -> str:
    """The id in the path, canonical; a malformed one names nothing, so it is 404."""
    raw = request.path_params[param]
    try:
        return str(UUID(raw))
    except ValueError:
        raise NotFoundError(f"{noun} {raw} not found") from None


def query_key(request: Request) -> tuple[str, ...]:
    """The request's query parameters as a cache key's parts (order-independent)."""
    return tuple(f"{k}={v}" for k, v in sorted(request.query_params.multi_items()))


def next_cursor(
    signer: paging.CursorSigner, tenant_id: UUID, request: paging.PageRequest, page: PageOfRows
) -> str | None:
    return paging.next_cursor(signer, tenant_id, request, page.rows[-1] if page.more else None)
