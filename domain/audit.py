"""Tamper evidence: each tenant's events form a hash chain in log order.

An event's canonical bytes are its stored record exactly as the event store keeps it
(position, aggregate id, version, topic, and the stored state bytes, length-prefixed so
no two records share an encoding). Its hash is SHA-256 of those bytes; the chain value
after it is SHA-256 of the previous chain value followed by the event's hash, starting
from 32 zero bytes. Change, remove or insert one event and every chain value from there
on changes.

A checkpoint (tenant, position, chain hash, event count) is signed so that an auditor who
kept one can later prove the log up to its position was not rewritten, even by someone
who recomputed the stored chain along with the events.

Everything here is plain hashlib on documented bytes, so an export can be verified with
no code of ours (docs/AUDITING.md spells it out).
"""

from __future__ import annotations

import hashlib
from uuid import UUID

import msgspec

GENESIS = "00" * 32
FORMAT = b"accubooks-event/1"
CHECKPOINT_FORMAT = b"accubooks-checkpoint/1"


def canonical_bytes(
    position: int, aggregate_id: UUID | str, version: int, topic: str, state: bytes
) -> bytes:
    header = b"\n".join(
        [
            FORMAT,
            str(position).encode(),
            str(aggregate_id).encode(),
            str(version).encode(),
            topic.encode(),
            str(len(state)).encode(),
        ]
    )
    return header + b"\n" + state


def event_hash(
    position: int, aggregate_id: UUID | str, version: int, topic: str, state: bytes
) -> str:
    """Hex SHA-256 of the event's canonical bytes."""
    record = canonical_bytes(position, aggregate_id, version, topic, state)
    return hashlib.sha256(record).hexdigest()


def chain_next(previous: str, hashed_event: str) -> str:
    """The chain value after an event: SHA-256 of the previous value and the event's hash
    (both as raw bytes), hex."""
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(hashed_event)).hexdigest()


def checkpoint_message(tenant_id: UUID | str, position: int, chain_hash: str, count: int) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return b"\n".join(
        [
            CHECKPOINT_FORMAT,
            str(tenant_id).encode(),
            str(position).encode(),
            chain_hash.encode(),
            str(count).encode(),
        ]
    )


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A tenant's chain head, signed: what /api/audit/checkpoint serves and what an
    auditor keeps (as JSON) to check the log later with `audit verify --against`."""

    tenant_id: str
    position: int
    chain_hash: str
    event_count: int
    algorithm: str = "Ed25519"
    key_id: str = ""
    # Base64 signature of checkpoint_message(tenant_id, position, chain_hash, event_count).
    signature: str = ""

    def message(self) -> bytes:
        return checkpoint_message(self.tenant_id, self.position, self.chain_hash, self.event_count)
