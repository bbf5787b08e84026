"""Rebuilding read models: replay the log from position 0 into shadow copies with the
live workers' own code (``apply_batch``), diff them row by row against the live read
models at the same position, and on request switch the live models over to them.

Shadows live apart from the live tables (a schema on PostgreSQL, a file per read model on
SQLite, see ``projections.shadow``), so a rebuild never locks a live table while it
replays; live tables are only read in the diff's snapshot and, on ``switch``, replaced in
one short transaction.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO
from uuid import UUID

import msgspec
from eventsourcing.persistence import Notification

from infra import coordination
from infra.cache import GenerationBumper, Invalidator, open_cache
from infra.eventstore import EventLog, open_event_log
from infra.logreader import LogReader
from infra.settings import Settings
from projections import compare, shadow
from projections.compare import TableDiff
from projections.errors import RebuildError
from projections.readmodel import Positioned, Projector, ReadModel, open_read_model

# The name of the lock that keeps two rebuilds from sharing the shadows.
_REBUILD_LOCK = "rebuild"
# Events per transaction of a rebuild (at most MAX_BATCH): larger than a live worker's,
# as a rebuild waits on no one and each transaction costs round trips.
DEFAULT_BATCH = 2000
MAX_BATCH = 5000
# Processes a PostgreSQL rebuild replays in (the read models split between them), and
# the fewest events worth starting them for: a process costs about a second to start,
# and one process cannot use more than one core (the projectors are Python).
DEFAULT_PROCESSES = 2
PARALLEL_MIN_EVENTS = 50_000
# Relative Python work per event of each read model, to balance the processes.
_WEIGHTS = {"scenarios": 3, "forecasts": 3, "audit": 3, "dashboard": 1, "usage": 1, "queue": 1}
# Rounds of catching up with moving live models before each is compared, at most: what
# is left is applied inside the comparison's snapshot.
_OUTSIDE_ROUNDS = 3


class ProjectionResult(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    name: str
    # The log position the rebuilt copy reached (and, when switched, the live model now has).
    position: int
    # With verify: the position at which both copies were compared.
    compared_at: int | None
    differences: int
    tables: list[TableDiff]
    switched: bool


class RebuildReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    projections: list[ProjectionResult]
    # Events read from the log and applied to every shadow that needed them.
    events: int
    seconds: float
    events_per_s: float
    # Of ``seconds``, the first replay from position 0 (the rest: catching up, comparing,
    # switching).
    replay_seconds: float
    differences: int


def batch_size(text: str) -> int:
    """A batch size given on the command line: 1 to MAX_BATCH."""
    value = int(text)
    if not 1 <= value <= MAX_BATCH:
        raise ValueError(f"a batch size is 1 to {MAX_BATCH}")
    return value


@dataclass
class _Build:
    projector: Projector
    live: ReadModel
    shadow: ReadModel
    position: int = 0  # the shadow's

    @property
    def name(self) -> str:
        return self.projector.name


def rebuild(
    settings: Settings,
    log: EventLog,
    projectors: Sequence[Projector],
    *,
    verify: bool = False,
    switch: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
    processes: int = DEFAULT_PROCESSES,
    parallel_min_events: int = PARALLEL_MIN_EVENTS,
) -> RebuildReport:
    """Rebuilds ``projectors`` into shadows; ``verify`` diffs each with its live model at
    the live model's position; ``switch`` then brings each shadow to the log's head and
    makes it the live model. A switch needs the read model's worker stopped: it holds the
    worker's lock from the start (waiting at most ``db_lock_timeout_s`` for it), so that
    a worker started meanwhile waits until the switch is done, then resumes from the new
    position.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if not stack.enter_context(_lock(settings, _REBUILD_LOCK)):
            raise RebuildError("another rebuild is running")
        if switch:
            # First, so that a running worker is found before a long replay, not after.
            for projector in projectors:
                if not stack.enter_context(_lock(settings, projector.name)):
                    raise RebuildError(
                        f"the {projector.name} projection worker is running (it holds its"
                        " lock): stop `accubooks project` (or `serve`) before --switch"
                    )
        builds = [_open(settings, p, stack) for p in projectors]
        # One pass over the log to the live models' positions (a diff compares there), or
        # to the log's head.
        head = log.position()
        targets = {b.name: b.live.position() if verify else head for b in builds}
        span = max(targets.values(), default=0)
        if (
            processes > 1
            and len(builds) > 1
            and settings.database_url
            and span >= parallel_min_events
        ):
            events = _replay_in_processes(
                settings, builds, targets, batch_size, progress, processes
            )
        else:
            events = _replay(log, builds, targets, batch_size, progress)
        if progress is not None:
            progress.done()
        replay_seconds = time.monotonic() - started
        if verify:
            events += _follow(log, builds, batch_size)
        cache = open_cache(settings, in_process=False) if switch else None
        results: list[ProjectionResult] = []
        for b in builds:
            compared_at, tables = None, list[TableDiff]()
            if verify:
                compared_at, tables, caught_up = _compare(log, b, batch_size)
                events += caught_up
            if switch:
                # No worker moves the live model now: the shadow may go to the head.
                events += _replay(log, [b], {b.name: log.position()}, batch_size, None)
                # Taken before the switch: a tenant whose rows the switch removes must be
                # invalidated too.
                tenant_ids = shadow.tenants(b.live, b.shadow) if cache is not None else []
                shadow.switch(settings, b.live, b.shadow)
                if cache is not None:
                    _invalidate(cache, settings.cache_prefix, b.name, tenant_ids)
            results.append(
                ProjectionResult(
                    name=b.name,
                    position=b.position,
                    compared_at=compared_at,
                    differences=sum(t.differences for t in tables),
                    tables=tables,
                    switched=switch,
                )
            )
    seconds = time.monotonic() - started
    return RebuildReport(
        projections=results,
        events=events,
        seconds=round(seconds, 3),
        events_per_s=round(events / seconds, 1) if seconds > 0 else 0.0,
        replay_seconds=round(replay_seconds, 3),
        differences=sum(r.differences for r in results),
    )


def _open(settings: Settings, projector: Projector, stack: contextlib.ExitStack) -> _Build:
    live = open_read_model(settings, projector)
    stack.callback(live.datastore.close)
    rebuilt = shadow.open_shadow(settings, projector)
    stack.callback(rebuilt.datastore.close)
    return _Build(projector=projector, live=live, shadow=rebuilt)


def _replay(
    log: EventLog,
    builds: Sequence[_Build],
    targets: Mapping[str, int],
    batch_size: int,
    progress: Progress | None,
) -> int:
    """Applies the log to each shadow up to its target, reading and decoding each page of
    the log once for all of them; returns the number of events read. A shadow ends exactly
    on its target even when no event has that position (gaps, or the last events lost)."""
    behind = [b for b in builds if b.position < targets[b.name]]
    if not behind:
        return 0
    position = min(b.position for b in behind)
    stop = max(targets[b.name] for b in behind)
    if progress is not None:
        progress.start(position, stop)
    read = 0
    reader = LogReader(log)
    # Each read model applies a page on its own connection, in its own thread: the
    # database works for one while Python works for another.
    with ThreadPoolExecutor(len(behind), thread_name_prefix="rebuild") as pool:
        while behind:
            decoded = reader.page(after=position, stop=stop, limit=batch_size)
            page = [stored for _, stored in decoded]
            # A short page means the log holds nothing more up to ``stop``.
            end = page[-1].id if len(page) == batch_size else stop
            events = [(event, stored.id) for event, stored in decoded]
            applying: list[tuple[_Build, int, Future[None]]] = []
            for b in behind:
                reach = min(end, targets[b.name])
                if reach > b.position:
                    mine = [i for i, n in enumerate(page) if b.position < n.id <= reach]
                    chosen = [events[i] for i in mine], reach, [page[i] for i in mine]
                    if len(behind) == 1:
                        _apply(b.shadow, *chosen)
                        b.position = reach
                    else:
                        applying.append((b, reach, pool.submit(_apply, b.shadow, *chosen)))
            # Every batch has finished (committed or rolled back) before a failure is raised.
            futures.wait([future for _, _, future in applying])
            for b, reach, future in applying:
                future.result()
                b.position = reach
            behind = [b for b in behind if b.position < targets[b.name]]
            position = end
            read += len(page)
            if progress is not None:
                progress.advance(len(page), position)
    return read


def _replay_in_processes(
    settings: Settings,
    builds: Sequence[_Build],
    targets: Mapping[str, int],
    batch_size: int,
    progress: Progress | None,
    processes: int,
) -> int:
    """``_replay`` with the read models split between processes (spawned, so that none
    inherits this one's pools and threads), each reading and decoding the log itself;
    the events read, counted once. The shadows exist already: a process only applies to
    them; their positions come back with the results."""
    groups: list[list[_Build]] = [[] for _ in range(min(processes, len(builds)))]
    for b in sorted(builds, key=lambda b: -_WEIGHTS.get(b.name, 1)):
        min(groups, key=lambda g: sum(_WEIGHTS.get(x.name, 1) for x in g)).append(b)
    first = min(b.position for b in builds)
    if progress is not None:
        progress.start(first, max(targets.values()))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
        running = [
            pool.submit(
                _replay_group,
                settings,
                [b.projector for b in group],
                {b.name: targets[b.name] for b in group},
                batch_size,
            )
            for group in groups
        ]
        shown = first
        while futures.wait(running, timeout=1.0).not_done:
            if progress is not None:
                reached = min(b.shadow.position() for b in builds)
                progress.advance(max(0, reached - shown), reached)
                shown = max(shown, reached)
        read = 0
        for future in running:
            positions, events = future.result()
            read = max(read, events)
            for b in builds:
                if b.name in positions:
                    b.position = positions[b.name]
    if progress is not None:
        progress.advance(0, min(b.position for b in builds))
    return read


def _replay_group(
    settings: Settings, projectors: Sequence[Projector], targets: Mapping[str, int], batch_size: int
) -> tuple[dict[str, int], int]:
    """In a process of a parallel replay: applies the log to these read models' shadows
    (from where they are) up to their targets; their positions and the events read."""
    log = open_event_log(settings)
    with contextlib.ExitStack() as stack:
        stack.callback(log.close)
        builds: list[_Build] = []
        for projector in projectors:
            rebuilt = shadow.open_shadow(settings, projector, fresh=False)
            stack.callback(rebuilt.datastore.close)
            builds.append(
                _Build(
                    projector=projector, live=rebuilt, shadow=rebuilt, position=rebuilt.position()
                )
            )
        read = _replay(log, builds, targets, batch_size, None)
        return {b.name: b.position for b in builds}, read


def _apply(
    model: ReadModel,
    events: Sequence[Positioned],
    position: int,
    notifications: Sequence[Notification],
) -> None:
    model.apply_batch(events, position, notifications)


def _follow(log: EventLog, builds: Sequence[_Build], batch_size: int) -> int:
    """Catches the shadows up with live models that moved during the replay, all together
    (one pass over the log per round), until each is within a batch of its live model or
    after a few rounds; returns the events read."""
    read = 0
    for _ in range(_OUTSIDE_ROUNDS):
        targets = {b.name: b.live.position() for b in builds}
        if all(targets[b.name] - b.position <= batch_size for b in builds):
            break
        read += _replay(log, builds, targets, batch_size, None)
    return read


def _compare(log: EventLog, b: _Build, batch_size: int) -> tuple[int, list[TableDiff], int]:
    """Brings the shadow to the live model's position P and diffs the two at P, inside one
    snapshot transaction that reads P, applies the events the shadow still misses up to P
    and compares the tables: a live model that keeps moving is caught in one round.
    Returns P, the differences and the events read."""
    with shadow.snapshot(b.live, b.shadow) as snap:
        live_at = snap.live_position()
        if live_at < b.position:
            raise RebuildError(
                f"the live {b.name} read model went back to position {live_at}"
                f" (the rebuild had reached {b.position}): is another rebuild switching it?"
            )
        with snap.lent(b.shadow):
            read = _replay(log, [b], {b.name: live_at}, batch_size, None)
        return live_at, snap.diff(b.projector), read


@contextlib.contextmanager
def _lock(settings: Settings, name: str) -> Iterator[bool]:
    """Holds the projection lock ``name`` (the one its worker holds while it runs); yields
    False when it could not be taken within ``db_lock_timeout_s``."""
    given_up = threading.Event()
    timer = threading.Timer(settings.db_lock_timeout_s, given_up.set)
    timer.daemon = True
    timer.start()
    try:
        with coordination.exclusive_worker(settings, name, given_up) as held:
            timer.cancel()
            yield held
    finally:
        timer.cancel()


def _invalidate(cache: GenerationBumper, prefix: str, name: str, tenant_ids: Sequence[str]) -> None:
    """A switch changed rows behind the shared cache (Redis): bumps the generation of this
    read model for every tenant it had or has. Without Redis there is nothing to reach:
    the embedded in-process cache lives in `serve`, which was stopped for the switch."""
    uuids: list[UUID] = []
    for tenant_id in tenant_ids:
        with contextlib.suppress(ValueError):
            uuids.append(UUID(tenant_id))
    Invalidator(cache, prefix).committed(name, uuids)


class Progress:
    """Progress of the replay on a stream: a bar redrawn in place on a terminal, else one
    line every ``every_s``. Events per second count events read from the log; the time
    left is estimated from the positions still to go."""

    def __init__(self, stream: TextIO | None = None, *, bar: bool, every_s: float = 10.0) -> None:
        self._stream = stream or sys.stderr
        self._bar = bar
        self._every_s = 0.2 if bar else every_s
        self._first = self._last = self._position = 0
        self._events = 0
        self._started = self._shown = 0.0

    def start(self, first: int, last: int) -> None:
        self._first, self._last, self._position = first, last, first
        self._events = 0
        self._started = self._shown = time.monotonic()

    def advance(self, events: int, position: int) -> None:
        self._events += events
        self._position = position
        now = time.monotonic()
        if now - self._shown >= self._every_s:
            self._shown = now
            self._show(now)

    def done(self) -> None:
        if self._events:
            self._show(time.monotonic())
            if self._bar:
                self._stream.write("\n")
                self._stream.flush()

    def _show(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        span = max(self._last - self._first, 1)
        share = min(1.0, (self._position - self._first) / span)
        moved = self._position - self._first
        left = (self._last - self._position) * elapsed / moved if moved else 0.0
        text = (
            f"{share:6.1%} {self._events:,} events, {self._events / elapsed:,.0f} events/s,"
            f" position {self._position:,} of {self._last:,}, {_clock(left)} left"
        )
        if self._bar:
            filled = round(share * 30)
            self._stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}   ")
        else:
            self._stream.write(f"rebuild: {text}\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def describe(report: RebuildReport) -> str:
    """The report as text: one line per read model, then its differing rows."""
    lines: list[str] = []
    for result in report.projections:
        what = f"rebuilt to position {result.position}"
        if result.compared_at is not None:
            n = result.differences
            what = f"{n} difference{'s' * (n != 1)} at position {result.compared_at}"
        if result.switched:
            what += f", switched (live at position {result.position})"
        lines.append(f"{result.name}: {what}")
        for table in result.tables:
            lines.extend(f"  {line}" for line in compare.describe_table(table))
    lines.append(
        f"{report.events:,} events in {report.seconds:.1f} s ({report.events_per_s:,.0f} events/s)"
    )
    return "\n".join(lines)
