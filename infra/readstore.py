"""Connections for the read side: read models are queried with one statement per request,
through a pool of autocommit connections (PostgreSQL) or per-thread read-only connections
to each projection's file (SQLite). Tests hook ``on_statement`` to count statements.

Every statement has a budget (``db_statement_timeout_s``). PostgreSQL enforces it
(statement_timeout, which also bounds waiting for a lock) and the client enforces it too,
for a server that does not answer at all: a watchdog shuts down the socket of a statement
still running shortly after the budget, so the thread is freed and the broken connection
leaves the pool. SQLite statements are interrupted by a progress handler. Either way the
read fails with OperationTimeoutError, and the connection left is healthy or discarded.

``counted_statements()`` collects the statements sent on behalf of one context (a test's
request and the threads it hands its query to), whatever else shares the store meanwhile
(the readiness refresher, projections): the one-statement-per-read rule is checked so.
"""

from __future__ import annotations

import contextvars
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from infra import errors, storeguard
from infra.eventstore import projection_file
from infra.settings import Settings

Row = Mapping[str, Any]

# How long after the server's own statement timeout the client gives up on it.
_CLIENT_GRACE_S = 0.25
_WATCH_EVERY_S = 0.05
# SQLite calls the deadline check every this many virtual machine instructions.
_SQLITE_CHECK_EVERY = 10_000

# The statements of the current context, while counted. Context variables follow a request
# into the threadpool (anyio copies the context), and not into other tasks or threads.
_counted: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "readstore_counted", default=None
)


@contextmanager
def counted_statements() -> Iterator[list[str]]:
    """The statements every read store sends for this context while the block runs."""
    statements: list[str] = []
    token = _counted.set(statements)
    try:
        yield statements
    finally:
        _counted.reset(token)


class _Watchdog:
    """Breaks the connections of statements running past their deadline."""

    def __init__(self, deadline_s: float) -> None:
        self._deadline_s = deadline_s
        self._lock = threading.Lock()
        self._running: dict[int, tuple[float, psycopg.Connection[Any]]] = {}
        self._broken: set[int] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._running[id(conn)] = (time.monotonic() + self._deadline_s, conn)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="readstore-watchdog", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def release(self, conn: psycopg.Connection[Any]) -> bool:
        """Stops watching; True if the watchdog broke this statement."""
        with self._lock:
            self._running.pop(id(conn), None)
            if id(conn) in self._broken:
                self._broken.discard(id(conn))
                return True
            return False

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                busy = bool(self._running)
                now = time.monotonic()
                late = [
                    (key, conn) for key, (deadline, conn) in self._running.items() if deadline < now
                ]
                for key, _ in late:
                    del self._running[key]
                    self._broken.add(key)
            for _, conn in late:
                _shut_down(conn)
            if busy:
                time.sleep(_WATCH_EVERY_S)
            else:
                self._wake.wait()
                self._wake.clear()

    def close(self) -> None:
        self._closed = True
        self._wake.set()


def _shut_down(conn: psycopg.Connection[Any]) -> None:
    """Wakes the thread blocked on this connection: its next read sees the end of the
    stream, libpq marks the connection bad and the pool throws it away."""
    try:
        dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


class _StaleConnectionError(psycopg.OperationalError):
    """The connection broke under a statement (no answer from the server at all)."""


class ReadStore:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.postgres = bool(settings.database_url)
        self.on_statement: Callable[[str], None] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sqlite_connections: list[sqlite3.Connection] = []
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._timeout_s = settings.db_statement_timeout_s
        self._watchdog = _Watchdog(settings.db_statement_timeout_s + _CLIENT_GRACE_S)
        if settings.database_url:
            self._pool = psycopg_pool.ConnectionPool(
                settings.database_url,
                min_size=1,
                max_size=settings.db_pool_size + settings.db_pool_max_overflow,
                timeout=settings.db_pool_timeout_s,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "cursor_factory": self._cursor_class(),
                    "options": f"-c statement_timeout={round(self._timeout_s * 1000)}",
                    "connect_timeout": settings.db_connect_timeout_s,
                },
                open=True,
                name="readstore",
            )
            self._outage = storeguard.OutageGuard(
                settings.database_url, self._renew_pool, name="read models"
            )

    def tracking_table(self, projection: str) -> str:
        """Where a projection's position is kept (the library names it per backend)."""
        return f"{projection}_tracking" if self.postgres else "tracking"

    def query(self, projection: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Runs one statement against a projection's tables (``?`` placeholders)."""
        if self._pool is not None:
            self._outage.check()
            return self._query_postgres(self._pool, sql, params)
        self._local.deadline = time.monotonic() + self._timeout_s
        try:
            return list(self._sqlite(projection).execute(sql, tuple(params)).fetchall())
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                raise self._over_budget() from e
            raise errors.StoreUnavailableError("the read models are unavailable") from e

    def _query_postgres(
        self, pool: psycopg_pool.ConnectionPool[Any], sql: str, params: Sequence[Any]
    ) -> list[Row]:
        try:
            try:
                return self._attempt(pool, sql, params)
            except _StaleConnectionError:
                # A pooled connection the server closed (it restarted, or dropped it while
                # idle): so may the others be. The pool throws this one away, checks the
                # idle ones (dropping the dead), and a read is safe to send once more.
                pool.check()
                return self._attempt(pool, sql, params)
        except psycopg.errors.QueryCanceled as e:
            raise self._over_budget() from e
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            self._outage.noticed(e)
            raise errors.StoreUnavailableError("the read models are unavailable") from e

    def _attempt(
        self, pool: psycopg_pool.ConnectionPool[Any], sql: str, params: Sequence[Any]
    ) -> list[Row]:
        with pool.connection() as conn:
            self._watchdog.watch(conn)
            try:
                return list(conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall())
            except psycopg.OperationalError as e:
                if self._watchdog.release(conn):
                    raise self._over_budget() from e
                if e.sqlstate is None and conn.broken:
                    raise _StaleConnectionError(str(e)) from e
                raise
            finally:
                self._watchdog.release(conn)

    def _renew_pool(self) -> None:
        if self._pool is not None:
            self._pool = storeguard.renewed(self._pool)

    def _over_budget(self) -> errors.OperationTimeoutError:
        return errors.OperationTimeoutError(f"the read did not finish within {self._timeout_s:g} s")

    def _past_deadline(self) -> int:
        # SQLite's progress handler: non-zero interrupts the running statement.
        deadline: float = getattr(self._local, "deadline", 0.0)
        return 1 if deadline and time.monotonic() > deadline else 0

    def _sqlite(self, projection: str) -> sqlite3.Connection:
        connections: dict[str, sqlite3.Connection] = self._local.__dict__.setdefault("c", {})
        conn = connections.get(projection)
        if conn is None:
            path = projection_file(self._settings, projection)
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.set_trace_callback(self._trace)
            conn.set_progress_handler(self._past_deadline, _SQLITE_CHECK_EVERY)
            connections[projection] = conn
            with self._lock:
                self._sqlite_connections.append(conn)
        return conn

    def _trace(self, statement: str) -> None:
        # The drivers' own hooks see every statement really sent, whoever issued it.
        counted = _counted.get()
        if counted is not None:
            counted.append(statement)
        if self.on_statement is not None:
            self.on_statement(statement)

    def _cursor_class(self) -> type[psycopg.Cursor[Any]]:
        store = self

        class TracedCursor(psycopg.Cursor[Any]):
            def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
                store._trace(str(query))
                return super().execute(query, params, **kwargs)

        return TracedCursor

    def close(self) -> None:
        self._watchdog.close()
        if self._pool is not None:
            self._outage.close()
            self._pool.close()
        with self._lock:
            for conn in self._sqlite_connections:
                conn.close()
            self._sqlite_connections.clear()
