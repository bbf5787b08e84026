"""Parked events, the operator's side: listing the events projections skipped because
their projector kept failing on them (the worker parks them, see projections.runner), and
replaying them into their read model once the projector is fixed.

A replayed event is applied after the events that followed it in the log. That is right
only when its effect commutes with theirs; so a replay is refused while later events of
the same aggregate exist, unless forced. When in doubt, `projections rebuild NAME
--switch` replays the whole log in order (and empties the parked list of that model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal
from uuid import UUID

import msgspec
from eventsourcing.persistence import PersistenceError

from infra.cache import Invalidator, open_cache
from infra.errors import InfraError
from infra.eventstore import EventLog
from infra.settings import Settings
from projections.errors import NotParkedError
from projections.readmodel import ParkedEvent, Projector, ReadModel, open_read_model

# The longest error message kept with a parked event.
MAX_MESSAGE = 2000


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    projection: str
    position: int
    # replayed: applied and unparked; failed: the projector still raises (it stays
    # parked); refused: not parked, or later events of its aggregate exist (not forced).
    outcome: Literal["replayed", "failed", "refused"]
    message: str | None = None


def describe_error(error: BaseException) -> tuple[str, str]:
    """The type and message kept with a parked event (the message bounded)."""
    return type(error).__name__, str(error)[:MAX_MESSAGE]


@contextlib.contextmanager
def _model(settings: Settings, projector: Projector) -> Iterator[ReadModel]:
    model = open_read_model(settings, projector)
    try:
        yield model
    finally:
        model.datastore.close()


def parked(settings: Settings, projectors: Sequence[Projector]) -> list[ParkedEvent]:
    """The parked events of these read models, by projection then position."""
    found: list[ParkedEvent] = []
    for projector in projectors:
        with _model(settings, projector) as model:
            found.extend(model.parked())
    return found


def replay(
    settings: Settings,
    log: EventLog,
    projector: Projector,
    positions: Sequence[int] | None = None,
    *,
    force: bool = False,
) -> list[ReplayResult]:
    """Applies the parked events at ``positions`` (None: all of them, in log order) to
    the projector's read model, each in its own transaction with the removal of its parked
    row. One that still fails stays parked, with the error in its result. Store failures
    raise (nothing is half-applied)."""
    name = projector.name
    results: list[ReplayResult] = []
    with _model(settings, projector) as model:
        waiting = {p.position: p for p in model.parked()}
        chosen = sorted(waiting) if positions is None else list(positions)
        for position in chosen:
            entry = waiting.get(position)
            if entry is None:
                results.append(
                    ReplayResult(
                        projection=name,
                        position=position,
                        outcome="refused",
                        message=f"no event is parked at {position} in {name}",
                    )
                )
                continue
            results.append(_replay_one(settings, log, model, entry, force=force))
    return results


def _replay_one(
    settings: Settings, log: EventLog, model: ReadModel, entry: ParkedEvent, *, force: bool
) -> ReplayResult:
    name, position = entry.projection, entry.position
    later = log.recorder.select_events(
        UUID(entry.aggregate_id), gt=entry.aggregate_version, limit=1
    )
    if later and not force:
        return ReplayResult(
            projection=name,
            position=position,
            outcome="refused",
            message=f"aggregate {entry.aggregate_id} has events after version"
            f" {entry.aggregate_version}, already applied: replaying it now would apply it"
            f" out of order (force it with --force if its effect commutes with theirs, or"
            f" run `accubooks projections rebuild {name} --switch`)",
        )
    [notification] = log.recorder.select_notifications(start=position, limit=1, stop=position)
    try:
        event = log.mapper.to_domain_event(notification)
        model.apply_parked((event, position), notification)
    except (PersistenceError, InfraError, OSError):
        raise
    except NotParkedError as e:
        return ReplayResult(projection=name, position=position, outcome="refused", message=str(e))
    except Exception as e:  # noqa: BLE001 (the projector still fails: it stays parked)
        error_type, message = describe_error(e)
        return ReplayResult(
            projection=name, position=position, outcome="failed", message=f"{error_type}: {message}"
        )
    tenant_id = getattr(event, "tenant_id", None)
    cache = open_cache(settings, in_process=False)
    if cache is not None and isinstance(tenant_id, UUID):
        # Redis only: the embedded in-process cache is out of reach (its TTL bounds it).
        Invalidator(cache, settings.cache_prefix).committed(name, [tenant_id])
    return ReplayResult(projection=name, position=position, outcome="replayed")
