"""Failing fast while PostgreSQL is down, and a fresh pool once it is back.

Without this, an outage costs every call the library's own retries (10 attempts, each
waiting up to the pool timeout: about 20 s with a 2 s timeout) before its 503, and after
the restart a pool's reconnection backoff (1 s doubling, up to 5 minutes) may keep the
service down for minutes longer (both measured with tests/service/test_postgres_outage).

An OutageGuard watches one pool. A connection-level failure through it (no connection in
time, a connection that broke; not a statement's own error) starts a probe in the
background with a fresh connection of its own (short connect timeout). If the probe
connects, it was no outage and nothing changes. If not, the server is marked down: every
call through the pool fails at once with StoreUnavailableError (which the library does
not retry), and the probe goes on every PROBE_EVERY_S; when it connects, the pool is
replaced by a new one built like it (its connections and its backoff belong to the dead
server) and the server is marked up. StoreGuard fits it to a library datastore; the read
store uses an OutageGuard directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
from eventsourcing.persistence import InterfaceError, OperationalError

from infra import errors

logger = logging.getLogger("accubooks.store")

PROBE_CONNECT_S = 1  # psycopg's connect_timeout is whole seconds
PROBE_EVERY_S = 0.25


class OutageGuard:
    """Knows whether a PostgreSQL server is down for one pool, and renews that pool once
    it answers again (``renew``); thread-safe."""

    def __init__(self, conninfo: str, renew: Callable[[], None], *, name: str) -> None:
        self._conninfo = conninfo
        self._renew = renew
        self.name = name
        self._lock = threading.Lock()
        self._down = False
        self._probing = False
        self._closed = threading.Event()
        self.renewals = 0  # pools replaced after an outage (for tests and logs)

    @property
    def down(self) -> bool:
        return self._down

    def close(self) -> None:
        self._closed.set()

    def check(self) -> None:
        """StoreUnavailableError at once while the server is known to be down."""
        if self._down:
            raise errors.StoreUnavailableError(f"the {self.name} is unavailable")

    def noticed(self, error: BaseException) -> None:
        """Called with an error of a call through the pool. A connection-level failure
        starts one probe in the background (the failing call is not held up): if a fresh
        connection fails too, the server is marked down, calls fail at once, and the
        probe goes on until it answers, then renews the pool."""
        if not _connection_failed(error):
            return
        with self._lock:
            if self._probing:
                return
            self._probing = True
        threading.Thread(target=self._probe, name=f"{self.name}-probe", daemon=True).start()

    def _answers(self) -> bool:
        try:
            with psycopg.connect(
                self._conninfo, connect_timeout=PROBE_CONNECT_S, autocommit=True
            ) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _probe(self) -> None:
        try:
            if self._answers():
                return  # not an outage: a busy pool, a broken connection, a lock timeout
            self._down = True
            logger.warning("the %s is down: failing fast until it answers again", self.name)
            while not self._closed.wait(PROBE_EVERY_S):
                if self._answers():
                    try:
                        self._renew()
                        self.renewals += 1
                    finally:
                        self._down = False
                    logger.warning("the %s answers again: a fresh pool serves it", self.name)
                    return
        finally:
            with self._lock:
                self._probing = False


def _connection_failed(error: BaseException) -> bool:
    """No connection was had in time, or the one had broke (not a statement's own error,
    such as a lock timeout or a cancelled query). Library errors carry the driver's as
    their cause."""
    cause = error.__cause__ if isinstance(error, OperationalError | InterfaceError) else error
    if cause is None:
        return True
    if isinstance(cause, psycopg_pool.PoolTimeout):
        return True
    if isinstance(cause, psycopg.OperationalError):
        return cause.sqlstate is None  # errors from the server carry a SQLSTATE
    return isinstance(cause, psycopg.InterfaceError)


def renewed(old: psycopg_pool.ConnectionPool[Any]) -> psycopg_pool.ConnectionPool[Any]:
    """A new pool built like ``old`` (also for the library's subclass), opened; ``old``
    closed (clients waiting on it get an error at once, which the next call no longer
    meets)."""
    options: dict[str, Any] = {}
    if hasattr(old, "get_password_func"):
        options["get_password_func"] = old.get_password_func
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
        name=old.name,
        **options,
    )
    new.open(wait=False)
    with contextlib.suppress(Exception):
        old.close(timeout=0)
    return new


class StoreGuard:
    """The guard fitted to a library datastore: wraps its ``get_connection`` (which the
    library calls from transaction() and cursor()) and renews its ``pool``."""

    def __init__(self, datastore: Any, conninfo: str, *, name: str = "event store") -> None:
        self._datastore = datastore
        self.outage = OutageGuard(conninfo, self._renew, name=name)
        inner: Callable[[], contextlib.AbstractContextManager[Any]] = datastore.get_connection
        self._inner = inner
        datastore.get_connection = self.get_connection

    @contextlib.contextmanager
    def get_connection(self) -> Iterator[Any]:
        self.outage.check()
        try:
            with self._inner() as conn:
                yield conn
        except (OperationalError, InterfaceError) as e:
            self.outage.noticed(e)
            raise

    def _renew(self) -> None:
        self._datastore.pool = renewed(self._datastore.pool)


def guard(datastore: Any, conninfo: str, *, name: str = "event store") -> StoreGuard:
    """Guards a PostgreSQL datastore of the eventsourcing library (see the module)."""
    return StoreGuard(datastore, conninfo, name=name)
