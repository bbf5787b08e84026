"""Projection workers: each follows the event log from its tracking position and applies
batches of up to ``batch_size`` events per transaction. One thread per projection; one
active worker per projection across processes (a lock); woken by new events (LISTEN on
PostgreSQL, in-process signals on SQLite) and at least every ``wakeup_s``, so a lost
notification or another process's write only delays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from eventsourcing.persistence import IntegrityError, PersistenceError

from infra import coordination
from infra.cache import Invalidator
from infra.errors import InfraError
from infra.eventstore import EventLog
from infra.settings import Settings
from projections.readmodel import Positioned, Projector, ReadModel, open_read_model

logger = logging.getLogger("accubooks.projections")

_RETRY_S = 1.0


class ProjectionWorker:
    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        projector: Projector,
        *,
        batch_size: int = 500,
        wakeup_s: float = 1.0,
        invalidator: Invalidator | None = None,
    ) -> None:
        self.name = projector.name
        self._invalidator = invalidator
        self._settings = settings
        self._log = log
        self._projector = projector
        self._batch_size = batch_size
        self._wakeup_s = wakeup_s
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._position = 0
        self._thread = threading.Thread(
            target=self._run, name=f"projection-{self.name}", daemon=True
        )
        self.model: ReadModel = open_read_model(settings, projector)
        self._position = self.model.position()

    @property
    def position(self) -> int:
        return self._position

    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        """Asks the worker to stop after its current batch (returns at once)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.signal_stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.model.datastore.close()

    def wait_for(self, position: int, timeout_s: float) -> bool:
        """True once this projection has applied the log up to ``position``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._position < position:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._changed.wait(left)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with coordination.exclusive_worker(self._settings, self.name, self._stop) as held:
                    if held:
                        self._follow()
            except (PersistenceError, InfraError, OSError) as e:
                # The store went away or a driver failed: keep the position, retry.
                logger.warning("projection %s paused: %s", self.name, e)
                self._stop.wait(_RETRY_S)
            except Exception:
                # A failing batch rolled back whole; log it loudly and retry from the
                # same position rather than let the thread die unnoticed.
                logger.exception("projection %s failed at position %d", self.name, self._position)
                self._stop.wait(_RETRY_S)

    def _follow(self) -> None:
        waiter = coordination.log_waiter(self._settings, self._log)
        try:
            self._advance(self.model.position())
            while not self._stop.is_set():
                if not self._catch_up():
                    if self._invalidator is not None:
                        self._invalidator.flush()  # a postponed invalidation, if any
                    waiter.wait(self._wakeup_s)
        finally:
            waiter.close()

    def _catch_up(self) -> bool:
        """Applies one batch; False when there was nothing new."""
        notifications = self._log.recorder.select_notifications(
            start=self._position, limit=self._batch_size, inclusive_of_start=False
        )
        if not notifications:
            return False
        mapper = self._log.mapper
        events: Sequence[Positioned] = [(mapper.to_domain_event(n), n.id) for n in notifications]
        last = notifications[-1].id
        try:
            self.model.apply_batch(events, last, notifications)
        except IntegrityError:
            # Another worker applied this range (a lock lost and retaken): resync.
            self._advance(self.model.position())
            return True
        if self._invalidator is not None:
            # Committed: the cached answers of the tenants this batch touched are stale.
            tenants = {t for event, _ in events if (t := getattr(event, "tenant_id", None))}
            self._invalidator.committed(self.name, tenants)
        self._advance(last)
        return True

    def _advance(self, position: int) -> None:
        with self._changed:
            self._position = position
            self._changed.notify_all()


class ProjectionRunner:
    """All projection workers of a process."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        projectors: Sequence[Projector],
        *,
        batch_size: int = 500,
        wakeup_s: float = 1.0,
        invalidator: Invalidator | None = None,
    ) -> None:
        self.workers = {
            p.name: ProjectionWorker(
                settings,
                log,
                p,
                batch_size=batch_size,
                wakeup_s=wakeup_s,
                invalidator=invalidator,
            )
            for p in projectors
        }

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    def stop(self) -> None:
        # All stop together: each may be in a wait of up to its wake-up interval.
        for worker in self.workers.values():
            worker.signal_stop()
        for worker in self.workers.values():
            worker.stop()

    def wait_for(self, position: int, timeout_s: float) -> bool:
        """True once every projection has reached ``position``."""
        deadline = time.monotonic() + timeout_s
        return all(
            worker.wait_for(position, max(0.0, deadline - time.monotonic()))
            for worker in self.workers.values()
        )
