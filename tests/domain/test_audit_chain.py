"""The chain's byte layout is a published contract (docs/AUDITING.md): pin it with known
answers computed independently here, and check that every field of an event is covered."""

from __future__ import annotations

import hashlib
import uuid

from hypothesis import given
from hypothesis import strategies as st

from domain import audit

AGGREGATE = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_an_event_hash_is_sha256_of_the_documented_layout() -> None:
    state = b'{"name":"x"}'
    layout = (
        b"accubooks-event/1\n7\n12345678-1234-5678-1234-567812345678\n3\n"
        b"accubooks:Scenario.Created\n12\n" + state
    )
    assert audit.canonical_bytes(7, AGGREGATE, 3, "accubooks:Scenario.Created", state) == layout
    assert (
        audit.event_hash(7, AGGREGATE, 3, "accubooks:Scenario.Created", state)
        == hashlib.sha256(layout).hexdigest()
    )


def test_the_chain_starts_from_zeros_and_hashes_raw_bytes() -> None:
    first = audit.event_hash(1, AGGREGATE, 1, "t", b"a")
    expected = hashlib.sha256(bytes(32) + bytes.fromhex(first)).hexdigest()
    assert audit.chain_next(audit.GENESIS, first) == expected


fields = st.tuples(
    st.integers(min_value=1, max_value=2**62),
    st.uuids(),
    st.integers(min_value=1, max_value=10**6),
    st.text(min_size=1, max_size=30),
    st.binary(max_size=64),
)


@given(fields, fields)
def test_different_records_never_share_canonical_bytes(
    a: tuple[int, uuid.UUID, int, str, bytes], b: tuple[int, uuid.UUID, int, str, bytes]
) -> None:
    # Length-prefixed state and newline-free header fields: the encoding is injective
    # for topics without newlines (ours are "accubooks:<Class>.<Event>").
    if "\n" in a[3] or "\n" in b[3]:
        return
    if a != b:
        assert audit.canonical_bytes(*a) != audit.canonical_bytes(*b)


def test_a_checkpoint_message_covers_every_field() -> None:
    base = audit.Checkpoint(tenant_id="t", position=5, chain_hash="ab", event_count=3)
    variants = [
        audit.Checkpoint(tenant_id="u", position=5, chain_hash="ab", event_count=3),
        audit.Checkpoint(tenant_id="t", position=6, chain_hash="ab", event_count=3),
        audit.Checkpoint(tenant_id="t", position=5, chain_hash="ac", event_count=3),
        audit.Checkpoint(tenant_id="t", position=5, chain_hash="ab", event_count=4),
    ]
    assert all(v.message() != base.message() for v in variants)
