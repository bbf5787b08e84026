"""Operator commands: register tenants, issue and revoke API keys. They run from the CLI
(on the embedded data folder or PostgreSQL) and are events like every other change."""

from __future__ import annotations

import secrets
from uuid import UUID

import msgspec

from commands.context import Collaborators
from commands.errors import NotFoundError
from domain import api_key
from domain.events import OPERATOR, Actor
from domain.tenant import Tenant

# Keys are 256 random bits; the prefix makes a leaked key easy to recognise and scan for.
KEY_PREFIX = "abk_"


class TenantCreated(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    tenant_id: UUID
    name: str


class KeyIssued(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    key_id: UUID
    tenant_id: UUID
    role: str
    key: str


class KeyRevoked(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    key_id: UUID
    revoked: bool


def _operator(deps: Collaborators, tenant_id: UUID) -> Actor:
    return Actor(tenant_id=tenant_id, actor_id=OPERATOR, request_id=str(deps.new_id()))


def create_tenant(deps: Collaborators, name: str) -> TenantCreated:
    name = name.strip()
    if not 1 <= len(name) <= 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("a tenant name is 1-200 characters, none of them control characters")
    tenant = Tenant.register(_operator(deps, deps.new_id()), name, at=deps.clock())
    deps.log.save(tenant)
    return TenantCreated(tenant_id=tenant.id, name=tenant.name)


def issue_key(deps: Collaborators, tenant_id: UUID, role: api_key.Role) -> KeyIssued:
    if deps.log.find(tenant_id, Tenant) is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = api_key.ApiKey.issue(
        _operator(deps, tenant_id), api_key.hash_key(secret), role, at=deps.clock()
    )
    deps.log.save(key)
    return KeyIssued(key_id=key.id, tenant_id=tenant_id, role=role, key=secret)


def revoke_key(deps: Collaborators, key_id: UUID) -> KeyRevoked:
    key = deps.log.find(key_id, api_key.ApiKey)
    if key is None:
        raise NotFoundError(f"key {key_id} not found")
    key.revoke(_operator(deps, key.tenant_id), at=deps.clock())
    deps.log.save(key)
    return KeyRevoked(key_id=key.id, revoked=True)
