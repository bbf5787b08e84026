"""`accubooks audit verify`: recomputes each tenant's hash chain from the raw event store
and compares it, position by position, with the audit read model's stored chain and, if
given, with a signed checkpoint an auditor kept.

The stored chain lives beside the events, so whoever can rewrite the log can rewrite it
too: comparing with it finds accidents and careless tampering; only a signed checkpoint
kept elsewhere proves that the log up to its position was not rewritten at all.

What a finding's ``kind`` means (per tenant, the first one is what to look at):

- ``changed``: the log and the chain both have the position, but the log's event there
  hashes differently (or no longer decodes, or now names another tenant).
- ``missing``: the chain has a position the log no longer has (for this tenant).
- ``extra``: the log has an event of the tenant at a position the chain lacks, within what
  the audit projection has applied. Events past that position are not yet projected:
  they are counted as ``pending``, never reported.
- ``chain-broken``: a stored chain value does not follow from the stored value before
  it and the stored event hash.
- ``copy-changed``: the audit copy of an event (what the audit log API serves) differs
  from the log although the stored hashes agree.
- ``head-mismatch``: the tenant's stored head (which checkpoints sign) disagrees with its
  stored chain.
- ``undecodable`` / ``no-tenant``: a stored record does not decode, or names no tenant
  (no tenant is known, so these are reported for the log as a whole).
- ``bad-signature``: the checkpoint's signature does not verify with the public key.
- ``checkpoint-mismatch``: the log up to the checkpoint's position does not reproduce
  its chain hash and event count: events the checkpoint covers were changed, removed or
  inserted, whatever the stored chain says.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable

from eventsourcing.persistence import Notification

from domain import audit
from infra.eventstore import EventLog
from infra.readstore import ReadStore
from infra.signing import verify_signature
from readapi import chain_reader
from readapi.chain_reader import ChainRow, Head, PageBudget, StoredChain
from readapi.verify_report import (
    CheckpointResult,
    Finding,
    TenantResult,
    VerifyReport,
    checkpoint_findings,
)

# Findings of the log as a whole kept in the report (the total is always counted).
_LOG_FINDINGS_KEPT = 100


class _TenantCheck:
    """One tenant's side of the merge: its log events (in order) against its stored chain
    rows (in order), with constant state besides the current page of rows."""

    __slots__ = (
        "_chain",
        "_head",
        "_headless",
        "_moved",
        "_stored_count",
        "_stored_prev",
        "head_seen",
        "result",
    )

    def __init__(
        self,
        tenant_id: str,
        chain: StoredChain,
        head: Head | None,
        *,
        headless: bool,
        previous: str,
        count: int,
        moved: dict[int, str],
    ) -> None:
        self.result = TenantResult(tenant_id=tenant_id, chain_hash=previous)
        self._chain = chain
        self._head = head
        self._headless = headless
        self._stored_prev = previous
        self._stored_count = count
        # What the log holds at positions whose event is not any tenant's own (shared).
        self._moved = moved
        self.head_seen = False

    def add(self, kind: str, position: int, detail: str) -> None:
        result = self.result
        result.findings += 1
        if result.first is None:
            result.first = Finding(
                kind=kind, position=position, tenant_id=result.tenant_id, detail=detail
            )

    def logged(self, position: int, hashed: str, aggregate_id: str, stored: Notification) -> bool:
        """The log's next event of this tenant (``aggregate_id`` is its originator id as
        text); False when the chain lacks it."""
        row = self._skip_to(position)
        matched = row is not None and row.position == position
        if row is not None and matched:
            self._chain.pop()
            if row.event_hash != hashed:
                self.add(
                    "changed",
                    position,
                    f"the log's event hashes to {hashed[:16]}, the chain recorded"
                    f" {row.event_hash[:16]}",
                )
            elif (
                row.state != stored.state
                or row.aggregate_id != aggregate_id
                or row.version != stored.originator_version
                or row.topic != stored.topic
            ):
                self.add("copy-changed", position, "the audit copy of the event differs")
            self._stored(row)
        else:
            self.add("extra", position, "the log has an event the chain never recorded")
        result = self.result
        if row is not None and matched and not result.findings:
            # Same events, same hashes, a consistent stored chain from the same start:
            # the recomputed chain is the stored one (and one hash cheaper per event).
            result.chain_hash = row.chain_hash
        else:
            result.chain_hash = audit.chain_next(result.chain_hash, hashed)
        result.position = position
        result.events += 1
        return matched

    def foreign(self, position: int, what: str) -> None:
        """The log's event at ``position`` is not this tenant's (only called when one
        tenant is verified: then no other tenant's check says so)."""
        row = self._skip_to(position)
        if row is not None and row.position == position:
            self._chain.pop()
            self.add("changed", position, f"the log's event there {what}")
            self._stored(row)

    def finish(self) -> None:
        """No more log events: the stored rows left are missing from the log."""
        while self._skip_to(None) is not None:
            pass
        head = self._head
        if head is not None and not self.head_seen:
            self.add(
                "head-mismatch",
                head.position,
                "the stored head names a position the stored chain does not have",
            )
        elif self._headless and self._stored_count > 0:
            self.add("head-mismatch", 0, "the tenant has a stored chain but no stored head")
        self._chain.close()

    def _skip_to(self, position: int | None) -> ChainRow | None:
        """Consumes the stored rows before ``position`` (all with None): the log lacks
        them. Returns the next row left."""
        chain = self._chain
        while (row := chain.peek()) is not None and (position is None or row.position < position):
            chain.pop()
            moved = self._moved.get(row.position)
            if moved is None:
                self.add("missing", row.position, "the chain has an event the log does not")
            else:
                self.add("changed", row.position, f"the log's event there {moved}")
            self._stored(row)
        return chain.peek()

    def _stored(self, row: ChainRow) -> None:
        expected = audit.chain_next(self._stored_prev, row.event_hash)
        if row.chain_hash != expected:
            self.add(
                "chain-broken",
                row.position,
                f"the stored chain value {row.chain_hash[:16]} does not follow from the one"
                f" before and the stored event hash (expected {expected[:16]})",
            )
        self._stored_prev = row.chain_hash
        self._stored_count += 1
        head = self._head
        if head is not None and row.position == head.position:
            self.head_seen = True
            if head.chain_hash != row.chain_hash or head.event_count != self._stored_count:
                self.add(
                    "head-mismatch",
                    row.position,
                    f"the stored head says {head.chain_hash[:16]} after {head.event_count}"
                    f" events, the stored chain {row.chain_hash[:16]} after"
                    f" {self._stored_count}",
                )


def public_key_id(public_key: str) -> str:
    """The short name infra.signing gives a key (so a report says which key checked)."""
    try:
        raw = base64.b64decode(public_key, validate=True)
    except binascii.Error:
        return "?"
    return hashlib.sha256(raw).hexdigest()[:16]


def verify(
    log: EventLog,
    store: ReadStore,
    *,
    tenant_id: str | None = None,
    start: int = 1,
    checkpoint: audit.Checkpoint | None = None,
    public_key: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> VerifyReport:
    """Verifies the tenant's (or every tenant's) chain from position ``start`` on, and
    the log against ``checkpoint`` (whose tenant must then be ``tenant_id``), checking
    its signature with ``public_key``."""
    began = clock()
    if checkpoint is not None and tenant_id != checkpoint.tenant_id:
        raise ValueError("a checkpoint is checked for its own tenant only")
    run = _Verification(store, tenant_id, max(1, start), checkpoint)
    # The checkpoint covers the log from its start, whatever --from says.
    read_from = 1 if checkpoint is not None else run.start
    for logged in chain_reader.read_log(log, after=read_from - 1):
        run.read(logged)
    return run.report(public_key or "", clock() - began)


class _Verification:
    """One run: the log's events are fed in order, each to its tenant's check."""

    def __init__(
        self,
        store: ReadStore,
        tenant_id: str | None,
        start: int,
        checkpoint: audit.Checkpoint | None,
    ) -> None:
        self.store = store
        self.start = start
        self.checkpoint = checkpoint
        # The heads first, then the position: each head's row is then within the rows read.
        self.heads = chain_reader.heads(store, tenant_id)
        self.bound = chain_reader.audit_position(store)
        self.budget = PageBudget()
        self.moved: dict[int, str] = {}
        self.checks: dict[str, _TenantCheck] = {}
        self.log_findings: list[Finding] = []
        self.log_finding_count = 0
        self.events_read = self.last = 0
        self.cp_chain, self.cp_count = audit.GENESIS, 0
        self.only = self.check_of(tenant_id) if tenant_id is not None else None

    def check_of(self, tenant: str) -> _TenantCheck:
        found = self.checks.get(tenant)
        if found is not None:
            return found
        previous, count = audit.GENESIS, 0
        if self.start > 1:
            before, count = chain_reader.chain_before(self.store, tenant, self.start)
            previous = before or audit.GENESIS
        chain = StoredChain(
            self.store, tenant, start=self.start, upto=self.bound, budget=self.budget
        )
        head = self.heads.get(tenant)
        found = self.checks[tenant] = _TenantCheck(
            tenant,
            chain,
            # A head before --from cannot be compared with the rows read.
            head if head is None or head.position >= self.start else None,
            headless=head is None,
            previous=previous,
            count=count,
            moved=self.moved,
        )
        return found

    def read(self, logged: chain_reader.LoggedEvent) -> None:
        stored = logged.stored
        position = self.last = stored.id
        self.events_read += 1
        tenant = logged.tenant_id
        if tenant is None:
            if position >= self.start:
                self._unreadable(logged)
            return
        only = self.only
        if only is not None and tenant != only.result.tenant_id:
            if self.start <= position <= self.bound:
                only.foreign(position, f"names tenant {tenant}")
            return
        aggregate_id = str(stored.originator_id)
        hashed = audit.event_hash(
            position, aggregate_id, stored.originator_version, stored.topic, stored.state
        )
        checkpoint = self.checkpoint
        if (
            checkpoint is not None
            and tenant == checkpoint.tenant_id
            and position <= checkpoint.position
        ):
            self.cp_chain = audit.chain_next(self.cp_chain, hashed)
            self.cp_count += 1
        if position < self.start:
            return
        check = self.check_of(tenant)
        if position > self.bound:
            check.result.pending += 1
        elif not check.logged(position, hashed, aggregate_id, stored):
            # Another tenant's chain may miss it: then the event moved, not vanished.
            self.moved[position] = f"names tenant {tenant}"

    def _unreadable(self, logged: chain_reader.LoggedEvent) -> None:
        position = logged.stored.id
        what = "no longer decodes" if logged.event is None else "names no tenant"
        self.moved[position] = what
        self.log_finding_count += 1
        if len(self.log_findings) < _LOG_FINDINGS_KEPT:
            self.log_findings.append(
                Finding(
                    kind="undecodable" if logged.event is None else "no-tenant",
                    position=position,
                    tenant_id=None,
                    detail=logged.error or "the event has no tenant_id",
                )
            )
        if self.only is not None and position <= self.bound:
            self.only.foreign(position, what)

    def report(self, public_key: str, elapsed: float) -> VerifyReport:
        if self.only is None:
            for tenant in sorted(chain_reader.chained_tenants(self.store) | set(self.heads)):
                self.check_of(tenant)
        for check in self.checks.values():
            check.finish()
        results = sorted((c.result for c in self.checks.values()), key=lambda r: r.tenant_id)
        findings = [*self.log_findings, *(r.first for r in results if r.first is not None)]
        checked: CheckpointResult | None = None
        if self.checkpoint is not None:
            checked = _check_checkpoint(
                self.store,
                self.checkpoint,
                public_key,
                log_chain=self.cp_chain,
                log_count=self.cp_count,
            )
            findings.extend(checkpoint_findings(checked))
        findings.sort(key=lambda f: (f.position, f.tenant_id or ""))
        return VerifyReport(
            clean=not findings,
            start=self.start,
            audit_position=self.bound,
            log_position=self.last,
            events_read=self.events_read,
            tenants=results,
            findings=findings,
            log_findings=self.log_finding_count,
            checkpoint=checked,
            elapsed_s=round(elapsed, 3),
            events_per_s=round(self.events_read / elapsed) if elapsed > 0 else 0,
        )


def _check_checkpoint(
    store: ReadStore,
    checkpoint: audit.Checkpoint,
    public_key: str,
    *,
    log_chain: str,
    log_count: int,
) -> CheckpointResult:
    valid = bool(checkpoint.signature) and verify_signature(
        public_key, checkpoint.message(), checkpoint.signature
    )
    return CheckpointResult(
        tenant_id=checkpoint.tenant_id,
        position=checkpoint.position,
        key_id=public_key_id(public_key),
        signature_valid=valid,
        chain_hash=checkpoint.chain_hash,
        event_count=checkpoint.event_count,
        log_chain_hash=log_chain,
        log_event_count=log_count,
        stored_chain_hash=chain_reader.stored_chain_at(
            store, checkpoint.tenant_id, checkpoint.position
        ),
        matches=log_chain == checkpoint.chain_hash and log_count == checkpoint.event_count,
    )
