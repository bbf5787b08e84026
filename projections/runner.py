"""Projection workers: each follows the event log from its tracking position and applies
batches of up to ``batch_size`` events per transaction. One thread per projection; one
active worker per projection across processes (a lock); woken by new events (LISTEN on
PostgreSQL, in-process signals on SQLite) and at least every ``wakeup_s``, so a lost
notification or another process's write only delays.

Failures: a store failure (the database away, a driver error) pauses the projection and
retries from its position. A batch the projector itself fails on (a bug, an event it
cannot handle) is tried ``projection_attempts`` times with a doubling backoff; then the
worker bisects it to the first failing event, commits the events before it, and parks it:
its parked row and the position past it commit in one transaction, so it is skipped
exactly once and never lost, and the projection goes on. Each projection has its own
thread, so one failing projector never holds up the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime

from eventsourcing.persistence import IntegrityError, Notification, PersistenceError

from infra import coordination
from infra.cache import Invalidator
from infra.clock import utc_now
from infra.errors import InfraError
from infra.eventstore import EventLog
from infra.settings import Settings
from projections import parking
from projections.errors import ProjectionBlockedError
from projections.readmodel import (
    ParkedEvent,
    Positioned,
    Projector,
    ReadModel,
    iso,
    open_read_model,
)

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
        """Applies one batch (or, when the projector fails on it, what of it can be
        applied, parking the event it fails on); False when there was nothing new."""
        notifications = self._log.recorder.select_notifications(
            start=self._position, limit=self._batch_size, inclusive_of_start=False
        )
        if not notifications:
            return False
        error = self._attempt(notifications)
        if error is not None:
            self._recover(notifications, error)
        return True

    def _attempt(self, notifications: Sequence[Notification]) -> Exception | None:
        """Applies these events (the next ones after the position) in one transaction:
        None when committed (or another worker had applied them), else the projector's
        error (rolled back whole). Store failures raise: they are no event's fault."""
        mapper = self._log.mapper
        try:
            events: Sequence[Positioned] = [
                (mapper.to_domain_event(n), n.id) for n in notifications
            ]
            self.model.apply_batch(events, notifications[-1].id, notifications)
        except IntegrityError:
            # Another worker applied this range (a lock lost and retaken): resync.
            position = self.model.position()
            if position == self._position:
                raise  # not the tracking row: a constraint of the read model's own tables
            self._advance(position)
            return None
        except (PersistenceError, InfraError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 (a projector failure, retried or parked)
            return e
        if self._invalidator is not None:
            # Committed: the cached answers of the tenants this batch touched are stale.
            tenants = {t for event, _ in events if (t := getattr(event, "tenant_id", None))}
            self._invalidator.committed(self.name, tenants)
        self._advance(notifications[-1].id)
        return None

    def _recover(self, notifications: Sequence[Notification], error: Exception) -> None:
        """After a batch failed: bounded retries, then bisection to the first failing
        event, which is parked. Stopping leaves the rest to the next run, from the
        committed position."""
        first_failed_at = utc_now()
        failures = 1
        delay_s = self._settings.projection_retry_s
        while failures < self._settings.projection_attempts:
            logger.warning(
                "projection %s: batch after position %d failed (attempt %d of %d): %s: %s",
                self.name,
                self._position,
                failures,
                self._settings.projection_attempts,
                type(error).__name__,
                error,
            )
            if self._stop.wait(delay_s):
                return
            delay_s *= 2
            retried = self._attempt(notifications)
            if retried is None:
                return
            error, failures = retried, failures + 1
        # notifications[low:high] fails from the committed position; each half that
        # applies is committed, so what is left narrows to the first failing event.
        low, high = 0, len(notifications)
        alone = high == 1  # whether the last failure was of the culprit alone
        while high - low > 1:
            middle = (low + high) // 2
            failed = self._attempt(notifications[low:middle])
            if failed is None:
                low, alone = middle, False
            else:
                error, high, failures = failed, middle, failures + 1
                alone = middle - low == 1
            if self._stop.is_set():
                return
        culprit = notifications[low]
        if not alone:
            # Only inferred to fail (from a larger range): confirm it alone.
            confirmed = self._attempt([culprit])
            if confirmed is None:
                return
            error, failures = confirmed, failures + 1
        self._park(culprit, error, first_failed_at, failures)

    def _park(
        self, culprit: Notification, error: Exception, first_failed_at: datetime, failures: int
    ) -> None:
        count = len(self.model.parked())
        if count >= self._settings.projection_max_parked:
            raise ProjectionBlockedError(
                f"{count} events are parked already (projection_max_parked): not parking"
                f" position {culprit.id} ({type(error).__name__}: {error}); fix the"
                " projector, then replay or rebuild"
            ) from error
        error_type, message = parking.describe_error(error)
        parked = ParkedEvent(
            projection=self.name,
            position=culprit.id,
            aggregate_id=str(culprit.originator_id),
            aggregate_version=culprit.originator_version,
            topic=culprit.topic,
            error_type=error_type,
            error_message=message,
            first_failed_at=iso(first_failed_at),
            attempts=failures,
        )
        try:
            self.model.apply_batch([], culprit.id, parked=parked)
        except IntegrityError:
            self._advance(self.model.position())  # another worker got there first
            return
        logger.error(
            "projection %s parked the event at position %d (%s, aggregate %s version %d)"
            " after %d failed attempts: %s: %s",
            self.name,
            culprit.id,
            culprit.topic,
            culprit.originator_id,
            culprit.originator_version,
            failures,
            error_type,
            message,
            exc_info=error,
        )
        self._advance(culprit.id)

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
