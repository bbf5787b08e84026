"""`accubooks audit export`: one tenant's events and chain as JSON lines, for auditors to
keep and verify offline with no code of ours (tools/verify_export.py, docs/AUDITING.md).

Line 1 is a header with the tenant's signed checkpoint and the public key; then one line
per event up to the checkpoint, in log order, with the exact stored bytes read from the
event store itself (base64) and the chain values the audit read model holds for them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from domain import audit
from infra.eventstore import EventLog
from infra.readstore import ReadStore
from infra.signing import ALGORITHM, CheckpointSigner
from readapi import chain_reader
from readapi.chain_reader import PageBudget, StoredChain
from readapi.errors import NotFoundError

FORMAT = "accubooks-audit-export"
VERSION = 1
# Event attributes that are already columns of the line.
_HEADER_FIELDS = frozenset({"originator_id", "originator_version"})


class ExportHeader(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    format: str
    version: int
    tenant_id: str
    exported_at: str
    checkpoint: audit.Checkpoint
    public_key: str
    # How eventHash and chainHash are computed (docs/AUDITING.md has the details).
    event_format: str = audit.FORMAT.decode()
    algorithm: str = ALGORITHM


class ExportedEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    position: int
    aggregate_id: str
    version: int
    type: str
    recorded_at: str | None
    actor_id: str | None
    request_id: str | None
    # Base64 of the exact stored bytes: what the hashes cover.
    state: str
    # The decoded event for people to read; not covered by the hashes (``state`` is).
    payload: Any
    # From the audit read model; None where it has no row for the event.
    event_hash: str | None
    chain_hash: str | None


class ExportSummary(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    tenant_id: str
    events: int
    position: int
    chain_hash: str
    # Log events the stored chain has no row for (the offline check will fail on them),
    # and records up to the checkpoint that do not decode (so their tenant is unknown).
    unchained: int
    undecodable: int


def signed_checkpoint(
    signer: CheckpointSigner, tenant_id: str, head: chain_reader.Head
) -> audit.Checkpoint:
    """The tenant's chain head, signed."""
    message = audit.checkpoint_message(tenant_id, head.position, head.chain_hash, head.event_count)
    return audit.Checkpoint(
        tenant_id=tenant_id,
        position=head.position,
        chain_hash=head.chain_hash,
        event_count=head.event_count,
        algorithm=ALGORITHM,
        key_id=signer.key_id,
        signature=signer.sign(message),
    )


def export_tenant(
    log: EventLog,
    store: ReadStore,
    signer: CheckpointSigner,
    tenant_id: str,
    out: TextIO,
    *,
    clock: Callable[[], datetime],
) -> ExportSummary:
    """Writes the tenant's export to ``out``; NotFoundError when it has no audited event."""
    head = chain_reader.heads(store, tenant_id).get(tenant_id)
    if head is None:
        raise NotFoundError(f"tenant {tenant_id} has no audited events")
    header = ExportHeader(
        format=FORMAT,
        version=VERSION,
        tenant_id=tenant_id,
        exported_at=_iso(clock()),
        checkpoint=signed_checkpoint(signer, tenant_id, head),
        public_key=signer.public_key,
    )
    encoder = msgspec.json.Encoder()
    out.write(encoder.encode(header).decode() + "\n")
    chain = StoredChain(store, tenant_id, start=1, upto=head.position, budget=PageBudget())
    events = unchained = undecodable = 0
    for logged in chain_reader.read_log(log, after=0, upto=head.position):
        if logged.tenant_id != tenant_id:
            undecodable += logged.event is None
            continue
        stored = logged.stored
        while (row := chain.peek()) is not None and row.position < stored.id:
            chain.pop()
        row = chain.peek()
        hashes: tuple[str | None, str | None] = (None, None)
        if row is not None and row.position == stored.id:
            chain.pop()
            hashes = (row.event_hash, row.chain_hash)
        else:
            unchained += 1
        line = ExportedEvent(
            position=stored.id,
            aggregate_id=str(stored.originator_id),
            version=stored.originator_version,
            type=stored.topic,
            recorded_at=_recorded_at(logged.event),
            actor_id=getattr(logged.event, "actor_id", None),
            request_id=getattr(logged.event, "request_id", None),
            state=base64.b64encode(stored.state).decode(),
            payload=_payload(logged.event),
            event_hash=hashes[0],
            chain_hash=hashes[1],
        )
        out.write(encoder.encode(line).decode() + "\n")
        events += 1
    chain.close()
    return ExportSummary(
        tenant_id=tenant_id,
        events=events,
        position=head.position,
        chain_hash=head.chain_hash,
        unchained=unchained,
        undecodable=undecodable,
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _recorded_at(event: Any) -> str | None:
    timestamp = getattr(event, "timestamp", None)
    return _iso(timestamp) if isinstance(timestamp, datetime) else None


def _payload(event: Any) -> Any:
    fields = {k: v for k, v in vars(event).items() if k not in _HEADER_FIELDS}
    # Values of types msgspec does not know are shown as their text.
    return msgspec.to_builtins(fields, enc_hook=str)
