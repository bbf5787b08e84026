"""What `accubooks audit verify` reports (readapi.verify): each finding, each tenant's
result, the checkpoint's, and the whole run, as JSON (msgspec) or as text for a terminal.
The kinds of finding are described in readapi.verify."""

from __future__ import annotations

import msgspec

from domain import audit

# Beyond this many, the text report counts the clean tenants instead of listing them.
_CLEAN_TENANTS_LISTED = 20


class Finding(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    kind: str
    position: int
    # None for findings about a record whose tenant is unknown (undecodable, no tenant).
    tenant_id: str | None
    detail: str


class TenantResult(msgspec.Struct, kw_only=True, rename="camel"):
    tenant_id: str
    # The tenant's log events compared with its stored chain.
    events: int = 0
    # The chain recomputed from the log, after its last compared event (``position``).
    chain_hash: str = audit.GENESIS
    position: int = 0
    # The tenant's events past the audit projection's position (not yet projected).
    pending: int = 0
    findings: int = 0
    first: Finding | None = None


class CheckpointResult(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    tenant_id: str
    position: int
    key_id: str
    signature_valid: bool
    # What the checkpoint says, what the log reproduces, and what the stored chain holds.
    chain_hash: str
    event_count: int
    log_chain_hash: str
    log_event_count: int
    stored_chain_hash: str | None
    matches: bool


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    clean: bool
    # The first position checked (--from), how far the audit projection has applied the
    # log (the chain's extent), and the newest position read from the log.
    start: int
    audit_position: int
    log_position: int
    events_read: int
    tenants: list[TenantResult]
    # The first finding of each tenant, the log's own (up to 100) and the checkpoint's.
    findings: list[Finding]
    log_findings: int
    checkpoint: CheckpointResult | None
    elapsed_s: float
    events_per_s: float


def checkpoint_findings(checked: CheckpointResult) -> list[Finding]:
    found: list[Finding] = []
    if not checked.signature_valid:
        found.append(
            Finding(
                kind="bad-signature",
                position=checked.position,
                tenant_id=checked.tenant_id,
                detail=f"the checkpoint's signature does not verify with key {checked.key_id}",
            )
        )
    if not checked.matches:
        stored = (
            "the stored chain agrees with the log, so it was rewritten as well"
            if checked.stored_chain_hash == checked.log_chain_hash
            else "the stored chain differs from both"
            if checked.stored_chain_hash != checked.chain_hash
            else "the stored chain still matches the checkpoint"
        )
        found.append(
            Finding(
                kind="checkpoint-mismatch",
                position=checked.position,
                tenant_id=checked.tenant_id,
                detail=(
                    f"the log up to position {checked.position} gives chain"
                    f" {checked.log_chain_hash[:16]} after {checked.log_event_count} events;"
                    f" the checkpoint says {checked.chain_hash[:16]} after"
                    f" {checked.event_count} ({stored})"
                ),
            )
        )
    return found


def render_text(report: VerifyReport) -> str:
    """The report for a terminal: a summary, then every finding, then the verdict."""
    tenants = len(report.tenants)
    pending = sum(r.pending for r in report.tenants)
    lines = [
        f"read {report.events_read} events up to position {report.log_position}"
        f" (audit chain applied to {report.audit_position}) for {tenants} tenant(s)"
        f" in {report.elapsed_s:.2f} s ({report.events_per_s} events/s)"
    ]
    if report.start > 1:
        lines.append(f"checked from position {report.start}")
    if pending:
        lines.append(f"{pending} event(s) past position {report.audit_position} not yet projected")
    clean = [r for r in report.tenants if r.first is None]
    if len(clean) > _CLEAN_TENANTS_LISTED:
        lines.append(f"{len(clean)} tenant(s) ok ({sum(r.events for r in clean)} events)")
        clean = []
    for r in clean:
        lines.append(
            f"tenant {r.tenant_id}: ok, {r.events} events, chain {r.chain_hash[:16]}"
            f" at position {r.position}"
        )
    for f in report.findings:
        who = f"tenant {f.tenant_id}" if f.tenant_id else "log"
        lines.append(f"{who}: FIRST BAD POSITION {f.position}: {f.kind}: {f.detail}")
    for r in report.tenants:
        if r.findings > 1:
            lines.append(f"tenant {r.tenant_id}: {r.findings - 1} more finding(s) after it")
    if report.log_findings > len([f for f in report.findings if f.tenant_id is None]):
        lines.append(f"log: {report.log_findings} unreadable record(s) in all")
    if report.checkpoint is not None:
        c = report.checkpoint
        lines.append(
            f"checkpoint of tenant {c.tenant_id} at position {c.position}: signature"
            f" {'valid' if c.signature_valid else 'INVALID'} (key {c.key_id}),"
            f" log {'matches' if c.matches else 'DOES NOT MATCH'}"
        )
    lines.append("clean" if report.clean else f"NOT CLEAN: {len(report.findings)} finding(s)")
    return "\n".join(lines)
