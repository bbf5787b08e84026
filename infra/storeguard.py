"""Failing fast while PostgreSQL is down, and a fresh pool once it is back.

Without this, an outage costs every call the library's own retries (10 attempts, each
waiting up to the pool timeout: about 20 s with a 2 s timeout) before its 503, and after
the restart the pool's reconnection backoff (1 s doubling, up to 5 minutes) may keep the
service down for minutes longer (both measured with tests/service/test_postgres_outage).

The guard wraps a library datastore's ``get_connection``:
- a connection-level failure (the pool gave no connection in time, the connection broke)
  is checked at once with a fresh connection of our own (bounded by a short connect
  timeout). If that connects, the failure was not an outage (a busy pool, a lock
  timeout) and is raised as it was. If not, the store is marked down;
- while down, every call fails at once with StoreUnavailableError, which the library does
  not retry, and a background thread probes the server every PROBE_EVERY_S;
- when a probe connects, the datastore gets a new pool built like the old one (its
  connections and its backoff belong to the dead server) and the store is marked up.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError

from infra import errors

logger = logging.getLogger("accubooks.store")

PROBE_CONNECT_S = 1  # psycopg's connect_timeout is whole seconds
PROBE_EVERY_S = 0.25


class StoreGuard:
    """One guard per datastore (its pool); thread-safe."""

    def __init__(self, datastore: Any, conninfo: str, *, name: str = "event store") -> None:
        self._datastore = datastore
        self._conninfo = conninfo
        self._name = name
        self._lock = threading.Lock()
        self._down = False
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        self.renewals = 0  # pools replaced after an outage (for tests and logs)
        inner: Callable[[], contextlib.AbstractContextManager[Any]] = datastore.get_connection
        self._inner = inner
        # The library calls self.get_connection() from transaction() and cursor().
        datastore.get_connection = self.get_connection

    @property
    def down(self) -> bool:
        return self._down

    def close(self) -> None:
        self._closed.set()

    @contextlib.contextmanager
    def get_connection(self) -> Iterator[Any]:
        if self._down:
            raise errors.StoreUnavailableError(f"the {self._name} is unavailable")
        try:
            with self._inner() as conn:
                yield conn
        except (OperationalError, InterfaceError) as e:
            if self._connection_failed(e) and not self._answers():
                self._mark_down()
                raise errors.StoreUnavailableError(f"the {self._name} is unavailable") from e
            raise

    @staticmethod
    def _connection_failed(error: Exception) -> bool:
        """No connection was had in time, or the one had broke (not a statement's own
        error, such as a lock timeout or a cancelled query)."""
        cause = error.__cause__
        if cause is None:
            return True
        if type(cause).__name__ == "PoolTimeout":
            return True
        if isinstance(cause, psycopg.OperationalError):
            return cause.sqlstate is None  # errors from the server carry a SQLSTATE
        return isinstance(cause, psycopg.InterfaceError)

    def _answers(self) -> bool:
        try:
            with psycopg.connect(
                self._conninfo, connect_timeout=PROBE_CONNECT_S, autocommit=True
            ) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _mark_down(self) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
            logger.warning("the %s is down: failing fast until it answers again", self._name)
            self._prober = threading.Thread(
                target=self._probe, name=f"{self._name}-probe", daemon=True
            )
            self._prober.start()

    def _probe(self) -> None:
        while not self._closed.wait(PROBE_EVERY_S):
            if not self._answers():
                continue
            with self._lock:
                self._renew_pool()
                self._down = False
            logger.warning("the %s answers again: a fresh pool serves it", self._name)
            return

    def _renew_pool(self) -> None:
        """A new pool like the old one, opened; the old one closed (clients waiting on it
        get an error at once, which the next call no longer meets)."""
        old = self._datastore.pool
        new = type(old)(
            conninfo=old.conninfo,
            kwargs=old.kwargs,
            min_size=old.min_size,
            max_size=old.max_size,
            open=False,
            configure=old._configure,
            timeout=old.timeout,
            max_waiting=old.max_waiting,
            max_lifetime=old.max_lifetime,
            max_idle=old.max_idle,
            check=old._check,
            connection_class=old.connection_class,
            get_password_func=getattr(old, "get_password_func", None),
        )
        new.open(wait=False)
        self._datastore.pool = new
        self.renewals += 1
        started = time.monotonic()
        with contextlib.suppress(Exception):
            old.close(timeout=0)
        logger.debug("old pool closed in %.3f s", time.monotonic() - started)


def guard(datastore: Any, conninfo: str, *, name: str = "event store") -> StoreGuard:
    """Guards a PostgreSQL datastore of the eventsourcing library (see the module)."""
    return StoreGuard(datastore, conninfo, name=name)
