"""The `accubooks projections parked` and `projections replay-parked` commands: list the
events projections skipped because their projector kept failing on them, and replay them
into their read model once the projector is fixed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import msgspec
from eventsourcing.persistence import PersistenceError

from infra.errors import InfraError
from infra.eventstore import open_event_log
from infra.settings import Settings
from projections import parking
from projections.readmodel import ParkedEvent, Projector

USAGE_ERROR = 2


def add_parsers(projection_cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    listed = projection_cmds.add_parser(
        "parked", help="list the events projections skipped because their projector failed"
    )
    listed.add_argument("names", nargs="*", metavar="NAME", help="read models (default: all)")
    listed.add_argument("--json", action="store_true", help="machine-readable output")
    replay = projection_cmds.add_parser(
        "replay-parked",
        help="apply parked events to their read model now, after a fix (exit 1 when one"
        " still fails: it stays parked)",
    )
    replay.add_argument("name", metavar="NAME", help="the read model")
    replay.add_argument("positions", nargs="*", type=int, metavar="POSITION")
    replay.add_argument("--all", action="store_true", help="every parked event, in log order")
    replay.add_argument(
        "--force",
        action="store_true",
        help="replay even when later events of the same aggregate were applied already",
    )
    replay.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, settings: Settings, projectors: Sequence[Projector]) -> int:
    known = {p.name: p for p in projectors}
    names = args.names if args.action == "parked" else [args.name]
    unknown = sorted(set(names) - set(known))
    if unknown:
        print(
            f"accubooks: no read model {', '.join(unknown)} (known: {', '.join(known)})",
            file=sys.stderr,
        )
        return USAGE_ERROR
    try:
        if args.action == "parked":
            return _list(args, settings, [known[n] for n in names] or list(known.values()))
        return _replay(args, settings, known[args.name])
    except (InfraError, PersistenceError) as e:
        print(f"accubooks: {e}", file=sys.stderr)
        return USAGE_ERROR


def _list(args: argparse.Namespace, settings: Settings, projectors: list[Projector]) -> int:
    found = parking.parked(settings, projectors)
    if args.json:
        print(msgspec.json.encode(found).decode(), flush=True)
    elif not found:
        print("no parked events", flush=True)
    else:
        print("\n".join(_line(p) for p in found), flush=True)
    return 0


def _line(parked: ParkedEvent) -> str:
    return (
        f"{parked.projection} position {parked.position}: {parked.topic} (aggregate"
        f" {parked.aggregate_id} version {parked.aggregate_version}), {parked.attempts}"
        f" attempts since {parked.first_failed_at}: {parked.error_type}: {parked.error_message}"
    )


def _replay(args: argparse.Namespace, settings: Settings, projector: Projector) -> int:
    if args.all == bool(args.positions):
        print("accubooks: give POSITION... or --all", file=sys.stderr)
        return USAGE_ERROR
    log = open_event_log(settings)
    try:
        results = parking.replay(
            settings, log, projector, None if args.all else args.positions, force=args.force
        )
    finally:
        log.close()
    if args.json:
        print(msgspec.json.encode(results).decode(), flush=True)
    else:
        for result in results:
            text = f"{result.projection} position {result.position}: {result.outcome}"
            print(text + (f" ({result.message})" if result.message else ""), flush=True)
    if any(r.outcome == "failed" for r in results):
        return 1
    return USAGE_ERROR if any(r.outcome == "refused" for r in results) else 0
