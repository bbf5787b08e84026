"""Authentication: a bearer key resolves to its tenant and role by one primary-key lookup
(the key's aggregate id is derived from its hash), cached per process for a short TTL so
that a revocation reaches every process within that TTL.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from uuid import UUID

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from domain import api_key
from infra import readstore
from infra.errors import ForbiddenError, UnauthorizedError
from infra.eventstore import EventLog

_MAX_KEY_CHARS = 512


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: UUID
    key_id: UUID
    role: api_key.Role


class Authenticator:
    def __init__(
        self,
        log: EventLog,
        *,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # key hash -> (expires at, principal or None for an unknown/revoked key)
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal when a fresh cached decision exists (no I/O); None otherwise.
        Raises UnauthorizedError for a malformed header or a cached refusal."""
        key_hash = _key_hash(authorization)
        with self._lock:
            entry = self._cache.get(key_hash)
        if entry is None or entry[0] < self._clock():
            return None
        return _accept(entry[1])

    def authenticate(self, authorization: str | None) -> Principal:
        """Resolves the header to a principal, reading the event store on a cache miss."""
        key_hash = _key_hash(authorization)
        with self._lock:
            entry = self._cache.get(key_hash)
        if entry is not None and entry[0] >= self._clock():
            return _accept(entry[1])
        key = self._log.find(api_key.key_id_for(key_hash), api_key.ApiKey)
        principal = None
        if key is not None and not key.revoked:
            principal = Principal(tenant_id=key.tenant_id, key_id=key.id, role=key.role)
        with self._lock:
            self._cache[key_hash] = (self._clock() + self._ttl_s, principal)
            self._cache.move_to_end(key_hash)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return _accept(principal)


def require_role(principal: Principal, *roles: api_key.Role) -> None:
    if principal.role not in roles:
        raise ForbiddenError(
            f"a {principal.role} key may not do this; it needs: {', '.join(roles)}"
        )


def _key_hash(authorization: str | None) -> str:
    if not authorization:
        raise UnauthorizedError("missing API key: send `Authorization: Bearer <key>`")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > _MAX_KEY_CHARS:
        raise UnauthorizedError("malformed Authorization header: expected `Bearer <key>`")
    return api_key.hash_key(secret)


def _accept(principal: Principal | None) -> Principal:
    if principal is None:
        raise UnauthorizedError("unknown or revoked API key")
    return principal


async def principal_of(request: Request) -> Principal:
    """The caller of an HTTP request; a cache hit costs no thread hop and no I/O."""
    authenticator: Authenticator = request.state.authenticator
    header = request.headers.get("authorization")
    principal = authenticator.cached(header)
    if principal is None:
        principal = await run_in_threadpool(authenticator.authenticate, header)
    # For the access log: who made the request, by ids only (never the key itself).
    request.state.tenant_id = principal.tenant_id
    request.state.key_id = principal.key_id
    # Tenant-scoped reads of this request see this tenant's rows only (row-level security).
    readstore.act_for(principal.tenant_id)
    return principal
