"""The `accubooks` command: operator commands (tenants, keys) and the process entry points.
Settings are read from the environment here, once, and passed down."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.persistence import PersistenceError

from commands import tenants
from commands.context import Collaborators
from commands.errors import CommandError
from domain import api_key
from domain.errors import DomainError
from infra import readstore
from infra import settings as settings_module
from infra.broker import open_broker
from infra.clock import utc_now
from infra.errors import InfraError
from infra.eventstore import EventLog, open_event_log
from projections import rebuild as rebuilder
from projections.errors import RebuildError
from service import audit_cli, draining, logs, metrics, parking_cli, wiring
from service.app import create_app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accubooks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tenant_cmds = sub.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True
    )
    create = tenant_cmds.add_parser("create", help="register a tenant")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="machine-readable output")

    key_cmds = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    issue = key_cmds.add_parser("issue", help="issue a key (printed once, stored as a hash)")
    issue.add_argument("tenant_id", type=UUID)
    issue.add_argument("--role", required=True, choices=api_key.ROLES)
    issue.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = key_cmds.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id", type=UUID)
    revoke.add_argument("--json", action="store_true", help="machine-readable output")

    projection_cmds = sub.add_parser("projections", help="maintain the read models").add_subparsers(
        dest="action", required=True
    )
    rebuild = projection_cmds.add_parser(
        "rebuild",
        help="replay the log into shadow read models; diff with --verify, replace with"
        " --switch (exit 1 when the diff found differences)",
    )
    rebuild.add_argument("names", nargs="*", metavar="NAME", help="read models (default: all)")
    rebuild.add_argument(
        "--verify", action="store_true", help="diff each with its live model at one position"
    )
    rebuild.add_argument(
        "--switch",
        action="store_true",
        help="make the rebuilt models live (their projection workers must be stopped)",
    )
    rebuild.add_argument(
        "--batch-size",
        type=rebuilder.batch_size,
        default=rebuilder.DEFAULT_BATCH,
        metavar="N",
        help=f"events per transaction (default {rebuilder.DEFAULT_BATCH})",
    )
    rebuild.add_argument("--json", action="store_true", help="print the report as JSON")
    parking_cli.add_parsers(projection_cmds)

    project = sub.add_parser("project", help="run the projection workers until stopped")
    project.add_argument("--json", action="store_true", help="print progress as JSON lines")
    worker = sub.add_parser("worker", help="run forecast job workers (needs BROKER_URL)")
    worker.add_argument("--json", action="store_true", help="print the start line as JSON")

    for name, text in (
        ("serve", "run the embedded all-in-one service (SQLite unless DATABASE_URL is set)"),
        ("api", "run an API process (production: reads DATABASE_URL, REDIS_URL, BROKER_URL)"),
    ):
        proc = sub.add_parser(name, help=text)
        proc.add_argument("--host", default="127.0.0.1")
        proc.add_argument("--port", type=int, default=8000)
        proc.add_argument("--json", action="store_true", help="print where it listens as JSON")
        if name == "api":
            proc.add_argument(
                "--workers",
                type=_workers,
                default=1,
                metavar="N",
                help="API processes sharing the port (default 1; more than 1 needs"
                " PROMETHEUS_MULTIPROC_DIR, an empty directory, so /metrics adds them up)",
            )
    reader = sub.add_parser(
        "reader-role",
        help="create the PostgreSQL role API processes read tenants' rows as (READ_DATABASE_URL)",
    )
    reader.add_argument("role", help="its name: lower-case letters, digits and _")
    reader.add_argument(
        "--password-env",
        metavar="VAR",
        help="set the role's password from this environment variable (never on the command line)",
    )
    reader.add_argument("--json", action="store_true", help="machine-readable output")
    audit_cli.add_parser(sub)
    return parser


def _workers(text: str) -> int:
    count = int(text)
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError("between 1 and 64")
    return count


def _print(result: msgspec.Struct, as_json: bool, text: str) -> None:
    print(msgspec.json.encode(result).decode() if as_json else text, flush=True)


def _operator_command(args: argparse.Namespace, log: EventLog) -> None:
    deps = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    if args.command == "tenants":
        created = tenants.create_tenant(deps, args.name)
        _print(created, args.json, f"tenant {created.tenant_id} ({created.name}) created")
    elif args.action == "issue":
        issued = tenants.issue_key(deps, args.tenant_id, args.role)
        _print(
            issued,
            args.json,
            f"key {issued.key_id} ({issued.role}) for tenant {issued.tenant_id}\n"
            f"secret (shown once, keep it safe): {issued.key}",
        )
    else:
        revoked = tenants.revoke_key(deps, args.key_id)
        _print(revoked, args.json, f"key {revoked.key_id} revoked")


def _listening(args: argparse.Namespace, settings: settings_module.Settings, url: str) -> None:
    store = "PostgreSQL" if settings.database_url else f"SQLite in {settings.data_dir}"
    where: dict[str, Any] = {"url": url, "eventStore": store}
    text = f"accubooks listening on {where['url']} (event store: {store})"
    print(msgspec.json.encode(where).decode() if args.json else text, flush=True)


def _serve(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    """Serves on one listening socket: in this process, or in ``--workers`` processes
    (draining.serve)."""
    workers: int = getattr(args, "workers", 1)
    if workers > 1 and not metrics.MULTIPROCESS:
        print(
            "accubooks: --workers above 1 needs PROMETHEUS_MULTIPROC_DIR (an empty directory)",
            file=sys.stderr,
        )
        return 2
    return draining.serve(
        create_app(settings, run_projections=args.command == "serve"),
        host=args.host,
        port=args.port,
        workers=workers,
        drain_s=settings.shutdown_drain_s,
        started=lambda url: _listening(args, settings, url),
    )


def _project(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    """Runs the projection workers until SIGTERM or SIGINT, then stops them cleanly (a
    batch in flight commits or rolls back whole)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log = open_event_log(settings)
    # Without a broker of its own there is nowhere to send jobs: the dispatcher then runs
    # in `accubooks serve`, whose in-process workers consume them.
    broker = open_broker(settings) if settings.broker_url else None
    runner = wiring.projection_runner(settings, log, broker)
    runner.start()
    names = ", ".join(runner.workers)
    started: dict[str, Any] = {"projections": list(runner.workers), "pid": os.getpid()}
    print(
        msgspec.json.encode(started).decode() if args.json else f"projecting: {names}", flush=True
    )
    try:
        stop.wait()
    finally:
        runner.stop()
        if broker is not None:
            broker.close()
        log.close()
    return 0


def _work(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    """Runs forecast job workers until SIGTERM or SIGINT; a job in flight finishes (or is
    redelivered by the broker if the process dies)."""
    if not settings.broker_url:
        print("accubooks: worker needs BROKER_URL (redis:// or amqp://)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log = open_event_log(settings)
    workers = wiring.job_workers(settings, log, open_broker(settings))
    workers.start()
    started: dict[str, Any] = {"worker": "forecasts", "pid": os.getpid()}
    print(msgspec.json.encode(started).decode() if args.json else "working: forecasts", flush=True)
    try:
        stop.wait()
    finally:
        workers.stop()
        log.close()
    return 0


def _projections(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    if args.action == "rebuild":
        return _rebuild(args, settings)
    # No dispatcher: its parked events would need a broker to replay to.
    return parking_cli.run(args, settings, wiring.projectors())


def _rebuild(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    """`projections rebuild`: 0 when every verified read model matched, 1 when one differs,
    2 when the rebuild could not be done."""
    known = {p.name: p for p in wiring.projectors()}  # no dispatcher: it has side effects
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        print(
            f"accubooks: no read model {', '.join(unknown)} (known: {', '.join(known)})",
            file=sys.stderr,
        )
        return 2
    chosen = [known[name] for name in args.names] if args.names else list(known.values())
    bar = sys.stderr.isatty()
    progress = rebuilder.Progress(sys.stderr, bar=bar) if bar or not args.json else None
    try:
        log = open_event_log(settings)
        try:
            report = rebuilder.rebuild(
                settings,
                log,
                chosen,
                verify=args.verify,
                switch=args.switch,
                batch_size=args.batch_size,
                progress=progress,
            )
        finally:
            log.close()
    except (RebuildError, InfraError, PersistenceError) as e:
        print(f"accubooks: {e}", file=sys.stderr)
        return 2
    _print(report, args.json, rebuilder.describe(report))
    return 1 if report.differences else 0


def _reader_role(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    """`reader-role`: the role, then the read models' grants to it (their tables are
    created if missing). Prints the READ_DATABASE_URL to give API processes."""
    if not settings.database_url:
        print("accubooks: reader-role needs DATABASE_URL (PostgreSQL)", file=sys.stderr)
        return 2
    password = os.environ.get(args.password_env) if args.password_env else None
    if args.password_env and not password:
        print(f"accubooks: {args.password_env} is not set", file=sys.stderr)
        return 2
    try:
        url = readstore.create_reader_role(settings.database_url, args.role, password)
        wiring.ensure_read_models(msgspec.structs.replace(settings, read_database_url=url))
    except (ValueError, RuntimeError, PersistenceError, InfraError) as e:
        print(f"accubooks: {e}", file=sys.stderr)
        return 1
    result = {"role": args.role, "readDatabaseUrl": url}
    text = f"role {args.role} ready; give API processes READ_DATABASE_URL={shlex.quote(url)}"
    print(msgspec.json.encode(result).decode() if args.json else text, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_module.from_env()
    if args.command in ("serve", "api"):
        logs.configure_logging(settings.log_level)
        return _serve(args, settings)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = {
        "project": _project,
        "worker": _work,
        "projections": _projections,
        "reader-role": _reader_role,
    }.get(args.command)
    if run is not None:
        return run(args, settings)
    if args.command == "audit":
        return audit_cli.run(args, settings)
    try:
        log = open_event_log(settings)
    except InfraError as e:
        print(f"accubooks: {e.message}", file=sys.stderr)
        return 1
    try:
        _operator_command(args, log)
    except (CommandError, DomainError, InfraError, ValueError) as e:
        print(f"accubooks: {e}", file=sys.stderr)
        return 1
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
