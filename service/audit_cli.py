"""The `accubooks audit` commands: `verify` (the raw log against the stored chain and a
kept checkpoint) and `export` (a tenant's events and chain as JSON lines)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO
from uuid import UUID

import msgspec

from domain import audit
from infra import signing
from infra.clock import utc_now
from infra.errors import InfraError
from infra.eventstore import open_event_log
from infra.readstore import ReadStore
from infra.settings import Settings
from projections.audit import AuditProjector
from projections.readmodel import open_read_model
from readapi import export, verify, verify_report
from readapi.errors import ReadError

USAGE_ERROR = 2


class _UsageError(Exception):
    """Raised for arguments that parse but cannot be used (exit status 2)."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmds = sub.add_parser("audit", help="verify and export the tamper-evident log").add_subparsers(
        dest="action", required=True
    )
    check = cmds.add_parser(
        "verify",
        help="recompute the hash chains from the raw event store and compare (exit 1 on"
        " any finding)",
    )
    check.add_argument("--tenant", type=UUID, help="only this tenant (default: every tenant)")
    check.add_argument(
        "--from",
        dest="start",
        type=int,
        default=1,
        metavar="P",
        help="start at position P, from the stored chain value just before it",
    )
    check.add_argument(
        "--against",
        metavar="CHECKPOINT_FILE",
        help="a signed checkpoint kept earlier (JSON, as /api/audit/checkpoint serves it)",
    )
    check.add_argument(
        "--public-key",
        metavar="B64",
        help="check the checkpoint's signature with this key (default: the service's own)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    dump = cmds.add_parser("export", help="write a tenant's events and chain as JSON lines")
    dump.add_argument("--tenant", type=UUID, required=True)
    dump.add_argument("--out", metavar="FILE", help="where to write (default: standard output)")
    dump.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.action == "verify":
            return _verify(args, settings)
        return _export(args, settings)
    except _UsageError as e:
        print(f"accubooks audit: {e}", file=sys.stderr)
        return USAGE_ERROR
    except (InfraError, ReadError) as e:
        print(f"accubooks audit: {e}", file=sys.stderr)
        return 1


def _open_store(settings: Settings) -> ReadStore:
    # The audit tables exist once any projection process has started; create them (empty)
    # otherwise, so a store that was never projected verifies as "all pending".
    open_read_model(settings, AuditProjector()).datastore.close()
    return ReadStore(settings)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    tenant_id = str(args.tenant) if args.tenant else None
    checkpoint: audit.Checkpoint | None = None
    public_key: str | None = None
    if args.against:
        checkpoint = _load_checkpoint(args.against)
        if tenant_id is not None and tenant_id != checkpoint.tenant_id:
            raise _UsageError(
                f"the checkpoint is of tenant {checkpoint.tenant_id}, not {tenant_id}"
            )
        tenant_id = checkpoint.tenant_id
        public_key = args.public_key or _service_public_key(settings)
    log = open_event_log(settings)
    store = _open_store(settings)
    try:
        report = verify.verify(
            log,
            store,
            tenant_id=tenant_id,
            start=args.start,
            checkpoint=checkpoint,
            public_key=public_key,
        )
    finally:
        store.close()
        log.close()
    print(msgspec.json.encode(report).decode() if args.json else verify_report.render_text(report))
    return 0 if report.clean else 1


def _load_checkpoint(path: str) -> audit.Checkpoint:
    """A checkpoint as the API serves it; also accepted: wrapped in {"data": ...} or an
    export file (its header carries the checkpoint)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _UsageError(f"cannot read {path}: {e.strerror}") from e
    try:
        found = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        try:
            # An export: JSON lines, the checkpoint in the first.
            found = msgspec.json.decode(raw.split(b"\n", 1)[0])
        except msgspec.DecodeError as e:
            raise _UsageError(f"{path} is not JSON: {e}") from e
    for key in ("checkpoint", "data"):
        if isinstance(found, dict) and key in found:
            found = found[key]
    try:
        return msgspec.convert(found, audit.Checkpoint)
    except msgspec.ValidationError as e:
        raise _UsageError(f"{path} is not a checkpoint: {e}") from e


def _service_public_key(settings: Settings) -> str:
    # Never generate a key just to check a signature: a new key verifies nothing.
    key_file = os.path.join(settings.data_dir, signing.KEY_FILE)
    if not settings.audit_signing_key and not os.path.exists(key_file):
        raise _UsageError(
            "no signing key is configured (ACCUBOOKS_AUDIT_SIGNING_KEY): pass --public-key"
        )
    return signing.load_signer(settings).public_key


def _export(args: argparse.Namespace, settings: Settings) -> int:
    log = open_event_log(settings)
    store = _open_store(settings)
    out: TextIO = sys.stdout
    try:
        if args.out:
            out = open(args.out, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed below)
        summary = export.export_tenant(
            log, store, signing.load_signer(settings), str(args.tenant), out, clock=utc_now
        )
    except OSError as e:
        raise _UsageError(f"cannot write {args.out}: {e.strerror}") from e
    finally:
        if out is not sys.stdout:
            out.close()
        store.close()
        log.close()
    # The export itself may be on standard output: the summary then goes to stderr.
    report_to = sys.stderr if out is sys.stdout else sys.stdout
    text = (
        f"exported {summary.events} events of tenant {summary.tenant_id} up to position"
        f" {summary.position} (chain {summary.chain_hash[:16]})"
        + (f" to {args.out}" if args.out else "")
    )
    print(msgspec.json.encode(summary).decode() if args.json else text, file=report_to)
    if summary.unchained or summary.undecodable:
        print(
            f"accubooks audit: {summary.unchained} event(s) have no stored chain row and"
            f" {summary.undecodable} record(s) do not decode: run `accubooks audit verify`",
            file=sys.stderr,
        )
        return 1
    return 0
