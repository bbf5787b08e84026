"""Paging of list reads: offset pages (`page`, `limit`) with totals kept by the read models
(no COUNT(*)), and keyset continuation with an opaque, signed cursor so deep pages cost
the same as the first. A cursor is bound to its tenant and filters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec

from readapi.errors import InvalidCursorError, QueryValidationError

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class Pagination(msgspec.Struct, frozen=True, kw_only=True):
    page: int
    limit: int
    total: int
    pages: int


class _CursorBody(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    tenant: str
    filters: dict[str, str]
    page: int
    created_at: str
    id: str


@dataclass(frozen=True)
class PageRequest:
    limit: int
    page: int
    # Keyset position to continue after (created_at, id), when a cursor was given.
    after: tuple[str, str] | None
    filters: dict[str, str]

    @property
    def offset(self) -> int:
        return 0 if self.after is not None else (self.page - 1) * self.limit


class CursorSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, body: _CursorBody) -> str:
        payload = msgspec.json.encode(body)
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:16]
        return f"{_b64(payload)}.{_b64(mac)}"

    def open(self, cursor: str, tenant_id: UUID, filters: Mapping[str, str]) -> _CursorBody:
        try:
            payload_text, mac_text = cursor.split(".")
            payload, mac = _unb64(payload_text), _unb64(mac_text)
        except ValueError:
            raise InvalidCursorError("the cursor is malformed") from None
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, expected):
            raise InvalidCursorError("the cursor was not issued by this service")
        try:
            body = msgspec.json.decode(payload, type=_CursorBody)
        except msgspec.DecodeError:
            raise InvalidCursorError("the cursor is malformed") from None
        if body.tenant != str(tenant_id):
            raise InvalidCursorError("the cursor belongs to another tenant")
        if body.filters != dict(filters):
            raise InvalidCursorError("the cursor was issued for other filters")
        return body


def page_request(
    params: Mapping[str, str],
    tenant_id: UUID,
    signer: CursorSigner,
    *,
    filters: Mapping[str, str] | None = None,
    allowed: frozenset[str] = frozenset(),
) -> PageRequest:
    unknown = set(params) - {"page", "limit", "cursor"} - allowed
    if unknown:
        raise QueryValidationError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    limit = _integer(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    filters = dict(filters or {})
    cursor = params.get("cursor")
    if cursor is None:
        return PageRequest(limit, _integer(params, "page", 1, 1, 10**9), None, filters)
    if "page" in params:
        raise QueryValidationError("send either `page` or `cursor`, not both")
    body = signer.open(cursor, tenant_id, filters)
    return PageRequest(limit, body.page, (body.created_at, body.id), filters)


def next_cursor(
    signer: CursorSigner, tenant_id: UUID, request: PageRequest, last: Mapping[str, Any] | None
) -> str | None:
    if last is None:
        return None
    body = _CursorBody(
        tenant=str(tenant_id),
        filters=request.filters,
        page=request.page + 1,
        created_at=str(last["created_at"]),
        id=str(last["id"]),
    )
    return signer.sign(body)


def pagination(request: PageRequest, total: int) -> Pagination:
    pages = math.ceil(total / request.limit) if total else 0
    return Pagination(page=request.page, limit=request.limit, total=total, pages=pages)


def _integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise QueryValidationError(f"`{name}` must be an integer from {low} to {high}")
    return int(raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or len(text) > 1024:
        raise ValueError("bad length")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as e:
        raise ValueError(str(e)) from e
