"""Group commit: concurrent commands of one process share one event-store transaction.

The store serializes writers (the library takes ``LOCK TABLE ... IN EXCLUSIVE MODE`` so
that positions commit in order) and every commit waits for its WAL flush; one transaction
for N commands pays both once. One committer thread per store takes the commands queued
while its previous transaction ran (at most ``max_size``) and saves them together. Each
command still gets exactly the answer it would get alone: a group the store refuses (a
version conflict, a duplicate receipt) is split in halves and retried until every failing
command is alone with its own error.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Recording

from infra.errors import RecordConflictError, StoreUnavailableError

# One transaction: every event given is saved, or none is (raises on refusal).
SaveEvents = Callable[[Sequence[Any]], list[Recording[UUID]]]
# Whether the log already holds an event at this event's aggregate id and version.
SlotTaken = Callable[[Any], bool]


class _Request:
    """One command's events, and once its group is done, its recordings or its error;
    the caller waits on ``wake`` (a thread) or ``future`` (a coroutine on ``loop``)."""

    __slots__ = ("error", "events", "future", "loop", "recordings", "wake")

    def __init__(
        self,
        events: Sequence[Any],
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[list[Recording[UUID]]] | None = None,
    ) -> None:
        self.events = events
        self.recordings: list[Recording[UUID]] | None = None
        self.error: BaseException | None = None
        self.loop = loop
        self.future = future
        self.wake = threading.Event() if future is None else None

    def answer(self) -> list[Recording[UUID]]:
        if self.error is not None:
            raise self.error
        assert self.recordings is not None
        return self.recordings


def _resolve(members: list[_Request]) -> None:
    """On the caller's event loop: hands each coroutine its answer (one wake-up of the
    loop per group, not per command)."""
    for member in members:
        future = member.future
        assert future is not None
        if future.done():  # its caller was cancelled: the answer is still in the log
            continue
        if member.error is not None:
            future.set_exception(member.error)
        else:
            future.set_result(member.answer())


class GroupCommitter:
    """Saves each caller's events in a transaction shared with concurrent callers.

    Threads call commit(), coroutines commit_async(); both wait while the committer
    thread (started on first use, stopped by close()) saves their group. Nobody waits for
    a timer: a group is whatever queued up during the previous transaction, so a lone
    command is saved at once.
    """

    def __init__(self, save: SaveEvents, taken: SlotTaken, *, max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._save = save
        self._taken = taken
        self._max_size = max_size
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    def commit(self, events: Sequence[Any]) -> list[Recording[UUID]]:
        """Saves ``events`` in one transaction (with others' events, maybe): their
        recordings in order, or RecordConflictError when these events alone would be
        refused; other errors of the store are raised as the store raised them."""
        request = _Request(events)
        self._enqueue(request)
        assert request.wake is not None
        request.wake.wait()
        return request.answer()

    async def commit_async(self, events: Sequence[Any]) -> list[Recording[UUID]]:
        """commit() for a coroutine: the event loop goes on serving while it waits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Recording[UUID]]] = loop.create_future()
        self._enqueue(_Request(events, loop, future))
        return await future

    def close(self) -> None:
        """Saves what is queued, then stops the committer thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _enqueue(self, request: _Request) -> None:
        with self._cond:
            if self._closed:
                raise StoreUnavailableError("the event store is closed")
            self._queue.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="accubooks-group-commit", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                size = min(self._max_size, len(self._queue))
                group = [self._queue.popleft() for _ in range(size)]
            try:
                self._commit_group(group)
            finally:
                self._finish(group)

    def _commit_group(self, group: list[_Request]) -> None:
        try:
            self._try_group(group)
        except Exception as e:  # noqa: BLE001 (each caller raises it)
            # The store failed: that transaction rolled back, so whoever has no answer
            # yet had nothing saved; each learns it.
            for member in group:
                if member.recordings is None and member.error is None:
                    member.error = e

    def _try_group(self, group: list[_Request]) -> None:
        try:
            recordings = self._save([event for member in group for event in member.events])
        except RecordConflictError as e:
            if len(group) == 1:
                group[0].error = e
                return
            refused = self._refused(group, e)
            if refused:
                self._commit_group([m for m in group if m.error is None])
                return
            # Refused for a reason the log did not show (a writer of another process
            # in between): halves until each refused command is alone.
            half = len(group) // 2
            self._commit_group(group[:half])
            self._commit_group(group[half:])
            return
        start = 0
        for member in group:
            member.recordings = recordings[start : start + len(member.events)]
            start += len(member.events)

    def _refused(self, group: list[_Request], conflict: RecordConflictError) -> int:
        """Gives a conflict to each member that would be refused alone: one of its
        events' slots (aggregate id and version) is already in the log (a replayed key,
        a stale decision), or an earlier member of the group claims it (two concurrent
        writers of one aggregate or one key: the first goes first). A replay storm then
        costs reads, not one refused transaction per command. How many were refused."""
        claimed: set[tuple[Any, int]] = set()
        refused = 0
        for member in group:
            slots = {(event.originator_id, event.originator_version) for event in member.events}
            if slots & claimed or any(self._taken(event) for event in member.events):
                # Its own instance: each caller raises it on its own thread.
                member.error = RecordConflictError(str(conflict))
                refused += 1
            else:
                claimed |= slots
        return refused

    def _finish(self, group: list[_Request]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        for member in group:
            if member.recordings is None and member.error is None:
                # The committer itself was torn down mid-group: nothing is known saved.
                member.error = StoreUnavailableError("the event store stopped while saving")
            if member.wake is not None:
                member.wake.set()
            elif member.loop is not None:
                by_loop.setdefault(member.loop, []).append(member)
        for loop, members in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, members)
            except RuntimeError:  # that loop is closed: nobody is left to answer
                continue
