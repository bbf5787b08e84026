"""The two sides an audit compares: the raw event log (each event's exact stored bytes,
its tenant learned by decoding it) and the audit read model's stored chain (its rows per
tenant, read lazily in keyset pages). Shared by `audit verify` and `audit export`.

Memory stays bounded: the log is read page by page, and the pages of stored rows held
for all tenants together stay under ``ROW_BUDGET`` rows whatever the number of tenants.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from eventsourcing.persistence import Notification

from infra.eventstore import EventLog
from infra.readstore import ReadStore
from readapi.context import position_sql

PROJECTION = "audit"
LOG_PAGE = 2000
# Stored rows held in memory across all tenants' pages; a tenant's page is this share of
# it, between _SMALLEST_PAGE and _LARGEST_PAGE rows.
ROW_BUDGET = 50_000
_SMALLEST_PAGE = 16
_LARGEST_PAGE = 1000


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One record of the event store, decoded if it can be."""

    stored: Notification
    # The decoded event, or None when the stored bytes do not decode (``error`` says why).
    event: Any
    tenant_id: str | None
    error: str | None = None


def read_log(log: EventLog, *, after: int, upto: int | None = None) -> Iterator[LoggedEvent]:
    """The log's records with positions in (after, upto], in order, one page at a time."""
    mapper = log.mapper
    while True:
        page = log.recorder.select_notifications(
            start=after, limit=LOG_PAGE, stop=upto, inclusive_of_start=False
        )
        for stored in page:
            try:
                event: Any = mapper.to_domain_event(stored)
            except Exception as e:  # noqa: BLE001 (any failure to decode is itself the finding)
                yield LoggedEvent(stored, None, None, f"{type(e).__name__}: {e}")
                continue
            tenant = getattr(event, "tenant_id", None)
            yield LoggedEvent(stored, event, None if tenant is None else str(tenant))
        if len(page) < LOG_PAGE:
            return
        after = page[-1].id


class ChainRow(NamedTuple):
    position: int
    aggregate_id: str
    version: int
    topic: str
    state: bytes
    event_hash: str
    chain_hash: str


class Head(NamedTuple):
    position: int
    chain_hash: str
    event_count: int


class PageBudget:
    """The stored chains one audit run has open: each one's pages are its share of
    ROW_BUDGET, so memory stays bounded however many tenants there are."""

    def __init__(self) -> None:
        self.open_chains = 0

    def page_size(self) -> int:
        share = ROW_BUDGET // max(1, self.open_chains)
        return max(_SMALLEST_PAGE, min(_LARGEST_PAGE, share))


class StoredChain:
    """One tenant's stored chain rows with positions in [start, upto], in order, fetched
    as they are consumed."""

    def __init__(
        self, store: ReadStore, tenant_id: str, *, start: int, upto: int, budget: PageBudget
    ) -> None:
        self._store = store
        self._tenant_id = tenant_id
        self._after = start - 1
        self._upto = upto
        self._budget = budget
        self._rows: deque[ChainRow] = deque()
        self._exhausted = False
        budget.open_chains += 1

    def close(self) -> None:
        self._rows.clear()
        if not self._exhausted:
            self._exhausted = True
            self._budget.open_chains -= 1

    def peek(self) -> ChainRow | None:
        if not self._rows and not self._exhausted:
            self._fetch()
        return self._rows[0] if self._rows else None

    def pop(self) -> ChainRow:
        return self._rows.popleft()

    def _fetch(self) -> None:
        limit = self._budget.page_size()
        rows = self._store.query(
            PROJECTION,
            "SELECT position, aggregate_id, version, topic, state, event_hash, chain_hash"
            " FROM audit_events WHERE tenant_id = ? AND position > ? AND position <= ?"
            " ORDER BY position LIMIT ?",
            [self._tenant_id, self._after, self._upto, limit],
        )
        self._rows.extend(
            ChainRow(
                int(r["position"]),
                r["aggregate_id"],
                int(r["version"]),
                r["topic"],
                bytes(r["state"]),
                r["event_hash"],
                r["chain_hash"],
            )
            for r in rows
        )
        if self._rows:
            self._after = self._rows[-1].position
        if len(rows) < limit:
            self._exhausted = True
            self._budget.open_chains -= 1


def audit_position(store: ReadStore) -> int:
    """How far the audit projection has applied the log (0 before its first batch)."""
    [row] = store.query(PROJECTION, f"SELECT {position_sql(store, PROJECTION)} AS position")
    return int(row["position"] or 0)


def heads(store: ReadStore, tenant_id: str | None = None) -> dict[str, Head]:
    """The stored chain head of each tenant (or of one)."""
    sql = "SELECT tenant_id, position, chain_hash, event_count FROM audit_heads"
    params: list[Any] = []
    if tenant_id is not None:
        sql += " WHERE tenant_id = ?"
        params.append(tenant_id)
    return {
        r["tenant_id"]: Head(int(r["position"]), r["chain_hash"], int(r["event_count"]))
        for r in store.query(PROJECTION, sql, params)
    }


def chained_tenants(store: ReadStore) -> set[str]:
    """Every tenant with a stored chain row."""
    rows = store.query(PROJECTION, "SELECT DISTINCT tenant_id FROM audit_events")
    return {r["tenant_id"] for r in rows}


def chain_before(store: ReadStore, tenant_id: str, position: int) -> tuple[str | None, int]:
    """The stored chain value just before ``position`` (None when the tenant has no row
    before it) and how many rows precede it."""
    [row] = store.query(
        PROJECTION,
        "SELECT (SELECT chain_hash FROM audit_events WHERE tenant_id = ? AND position < ?"
        "  ORDER BY position DESC LIMIT 1) AS chain_hash,"
        " (SELECT COUNT(*) FROM audit_events WHERE tenant_id = ? AND position < ?) AS n",
        [tenant_id, position, tenant_id, position],
    )
    return row["chain_hash"], int(row["n"])


def stored_chain_at(store: ReadStore, tenant_id: str, position: int) -> str | None:
    """The stored chain value at ``position``, if the tenant has a row there."""
    rows = store.query(
        PROJECTION,
        "SELECT chain_hash FROM audit_events WHERE tenant_id = ? AND position = ?",
        [tenant_id, position],
    )
    return rows[0]["chain_hash"] if rows else None
