"""Exactly-once commands. A command's events and its receipt are saved in one transaction;
a retry with the same key and the same validated body gets the stored answer byte for
byte; concurrent requests with one key race on the receipt's id, so exactly one of them
commits and the others answer what it stored.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import BaseAggregate
from eventsourcing.persistence import Recording

from commands.context import Collaborators, CommandContext
from commands.errors import (
    CommandError,
    IdempotencyKeyInUseError,
    IdempotencyKeyReusedError,
)
from domain.errors import DomainError
from domain.receipt import CommandReceipt, receipt_id_for
from infra.errors import RecordConflictError

CONSISTENCY_TOKEN = "X-Consistency-Token"  # noqa: S105 (a header name)
REPLAYED = "Idempotent-Replayed"

_canonical = msgspec.json.Encoder(order="sorted")
# Its own generator: jitter must not disturb (or be disturbed by) the global one.
_jitter = random.Random()


@dataclass(frozen=True)
class Outcome:
    """What a decided command saves and answers (the answer goes into the receipt)."""

    aggregates: Sequence[BaseAggregate[UUID]]
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A loaded and validated command, ready to be decided."""

    command: msgspec.Struct
    decide: Callable[[], Outcome]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]


def fingerprint(route: str, command: msgspec.Struct) -> str:
    """Same route and same validated command (whatever the key order, whitespace or
    money spelling the client used) give the same fingerprint."""
    digest = hashlib.sha256(route.encode())
    digest.update(b"\n")
    digest.update(_canonical.encode(command))
    return digest.hexdigest()


def run(deps: Collaborators, ctx: CommandContext, route: str, attempt: Callable[[], Plan]) -> Reply:
    """Runs a command at most once per idempotency key.

    ``attempt`` loads what the command needs and validates it; it is called again when a
    concurrent save won, so the retry decides on fresh state (or replays the winner's
    answer when the winner had our key).

    The first try does not read the receipt: a fresh key (nearly every request) then
    costs no read at all, and a used key still cannot slip through, because the receipt's
    id is derived from the key and the store refuses a second one in the save that would
    record it. So a used key shows up either as that conflict or as the decision failing
    on state its first run changed; both are checked against the receipt before answering.
    """
    receipt_id = receipt_id_for(ctx.actor.tenant_id, ctx.idempotency_key)
    for tries in range(deps.attempts):
        if tries:
            # Jittered exponential backoff spreads writers that keep colliding on one
            # aggregate, so each retry has a fair chance (bounded: 50 ms at most).
            time.sleep(_jitter.uniform(0, min(0.05, 0.001 * 2**tries)))
        plan = attempt()
        fprint = fingerprint(route, plan.command)
        if tries:
            stored = deps.log.find(receipt_id, CommandReceipt)
            if stored is not None:
                return _replay(deps, stored, fprint)
        try:
            outcome = plan.decide()
        except (CommandError, DomainError):
            # A replay of an archive or of an If-Match update fails to decide again:
            # the stored answer wins over the refusal.
            stored = None if tries else deps.log.find(receipt_id, CommandReceipt)
            if stored is not None:
                return _replay(deps, stored, fprint)
            raise
        receipt = _receipt(deps, ctx, route, fprint, outcome)
        try:
            recordings = deps.log.commit(*outcome.aggregates, receipt)
        except RecordConflictError:
            continue
        return _answer(outcome, recordings)
    raise IdempotencyKeyInUseError(
        "the command kept colliding with concurrent ones; retry with the same Idempotency-Key"
    )


async def first_try_async(
    deps: Collaborators, ctx: CommandContext, route: str, plan: Plan
) -> Reply | None:
    """run()'s first try on the event loop, for a command that reads nothing to decide
    (a creation) while the store groups commits: no worker thread, no receipt read.
    None when run() must take over (the decision refused, or the save conflicted: a
    used key or a concurrent change), so every answer but the common one stays run()'s.
    """
    fprint = fingerprint(route, plan.command)
    try:
        outcome = plan.decide()
    except (CommandError, DomainError):
        return None
    receipt = _receipt(deps, ctx, route, fprint, outcome)
    try:
        recordings = await deps.log.commit_async(*outcome.aggregates, receipt)
    except RecordConflictError:
        return None
    return _answer(outcome, recordings)


def _receipt(
    deps: Collaborators, ctx: CommandContext, route: str, fprint: str, outcome: Outcome
) -> CommandReceipt:
    return CommandReceipt.record(
        ctx.actor,
        idempotency_key=ctx.idempotency_key,
        route=route,
        fingerprint=fprint,
        status=outcome.status,
        body=outcome.body.decode(),
        headers=outcome.headers,
        at=deps.clock(),
    )


def _answer(outcome: Outcome, recordings: Sequence[Recording[UUID]]) -> Reply:
    position = recordings[-1].notification.id
    headers = {**outcome.headers, CONSISTENCY_TOKEN: str(position)}
    return Reply(outcome.status, outcome.body, headers)


def _replay(deps: Collaborators, stored: CommandReceipt, fprint: str) -> Reply:
    if stored.fingerprint != fprint:
        raise IdempotencyKeyReusedError(
            "this Idempotency-Key was already used with another request; use a new key"
        )
    # The log's newest position is at or past the stored command's events, so a read
    # that waits for it sees the command.
    headers: dict[str, Any] = {
        **stored.headers,
        CONSISTENCY_TOKEN: str(deps.log.position()),
        REPLAYED: "true",
    }
    return Reply(stored.status, stored.body.encode(), headers)
