"""Connections for the read side: read models are queried with one statement per request,
through a pool of autocommit connections (PostgreSQL) or per-thread read-only connections
to each projection's file (SQLite). Tests hook ``on_statement`` to count statements.

Every statement has a budget (``db_statement_timeout_s``). PostgreSQL enforces it
(statement_timeout, which also bounds waiting for a lock) and the client enforces it too,
for a server that does not answer at all: a watchdog shuts down the socket of a statement
still running shortly after the budget, so the thread is freed and the broken connection
leaves the pool. SQLite statements are interrupted by a progress handler. Either way the
read fails with OperationTimeoutError, and the connection left is healthy or discarded.

Tenancy in depth (PostgreSQL): ``ReadStore.for_tenants`` connects as READ_DATABASE_URL's
role, which row-level security binds (the projections enable it on every read-model table
with a tenant_id, see projections/readmodel.py). Each of its reads runs in a transaction
that first sets ``accubooks.tenant`` to the tenant acting in this context (``act_for``,
called when a request is authenticated), all in one round trip (a pipeline of BEGIN, the
setting, the query and COMMIT). A read outside any tenant's context sees no tenant's rows.

``counted_statements()`` collects the statements sent on behalf of one context (a test's
request and the threads it hands its query to), whatever else shares the store meanwhile
(the readiness refresher, projections): the one-statement-per-read rule is checked so.
"""

from __future__ import annotations

import contextvars
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql as pgsql
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
# The tenant whose rows a tenant-scoped store may see, in this context (a request's, and
# the threads it hands its reads to).
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("readstore_tenant", default="")
# The setting the row-level security policies compare each row's tenant_id with.
TENANT_SETTING = "accubooks.tenant"


# The names `create_reader_role` makes (and the read models' DDL accepts) unquoted.
READER_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def create_reader_role(database_url: str, role: str, password: str | None = None) -> str:
    """Creates (or brings back into line) a login role that row-level security binds: no
    superuser, no BYPASSRLS, nothing it could create. It owns nothing, and is granted SELECT
    on the read models' tenant tables when a process creates them with READ_DATABASE_URL
    naming it. Returns READ_DATABASE_URL for it (without the password)."""
    if not READER_ROLE_NAME.fullmatch(role):
        raise ValueError(f"a reader role is named in lower-case letters, digits and _: {role!r}")
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
            statement = pgsql.SQL(
                "{verb} ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                " NOREPLICATION NOINHERIT"
            ).format(verb=pgsql.SQL("ALTER" if found else "CREATE"), role=pgsql.Identifier(role))
            if password:
                statement += pgsql.SQL(" PASSWORD {}").format(pgsql.Literal(password))
            conn.execute(statement)
    except psycopg.Error as e:
        raise RuntimeError(f"the role {role} could not be made: {e}") from e
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    params.pop("password", None)  # the owner's, not the reader's
    params["user"] = role
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def act_for(tenant_id: object) -> None:
    """From now on in this context, tenant-scoped reads see this tenant's rows only."""
    _tenant.set(str(tenant_id))


@contextmanager
def acting_for(tenant_id: object) -> Iterator[None]:
    """``act_for`` for the length of a block (tools and tests outside a request)."""
    token = _tenant.set(str(tenant_id))
    try:
        yield
    finally:
        _tenant.reset(token)


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
    def __init__(self, settings: Settings, *, database_url: str | None = None) -> None:
        """``database_url`` (PostgreSQL): connect there instead of DATABASE_URL, with every
        read scoped to the acting tenant (see ``for_tenants``)."""
        self._settings = settings
        self.postgres = bool(settings.database_url)
        self.tenant_scoped = bool(self.postgres and database_url)
        url = database_url if self.tenant_scoped else settings.database_url
        self.on_statement: Callable[[str], None] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sqlite_connections: list[sqlite3.Connection] = []
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._timeout_s = settings.db_statement_timeout_s
        self._watchdog = _Watchdog(settings.db_statement_timeout_s + _CLIENT_GRACE_S)
        if url:
            self._pool = psycopg_pool.ConnectionPool(
                url,
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
            self._outage = storeguard.OutageGuard(url, self._renew_pool, name="read models")

    @classmethod
    def for_tenants(cls, settings: Settings) -> ReadStore:
        """The store the read API serves tenants from: on PostgreSQL with READ_DATABASE_URL
        set, as that role and scoped to the acting tenant; otherwise a plain one."""
        return cls(settings, database_url=settings.read_database_url)

    def check_scoped_role(self) -> None:
        """Refuses a tenant-scoped store whose role row-level security does not bind (a
        superuser, BYPASSRLS, or the owner of the tables, which the policies exempt)."""
        if self._pool is None or not self.tenant_scoped:
            return
        with self._pool.connection() as conn:
            [row] = conn.execute(
                "SELECT r.rolname, r.rolsuper, r.rolbypassrls,"
                " EXISTS (SELECT 1 FROM pg_tables WHERE tableowner = current_user"
                " AND tablename = 'scenarios_rows') AS owner"
                " FROM pg_roles r WHERE r.rolname = current_user"
            ).fetchall()
        if row["rolsuper"] or row["rolbypassrls"] or row["owner"]:
            raise RuntimeError(
                f"READ_DATABASE_URL's role {row['rolname']!r} is exempt from row-level security"
                " (a superuser, BYPASSRLS or the tables' owner): use a role made by"
                " `accubooks reader-role`"
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
                if self.tenant_scoped:
                    return self._in_tenant_transaction(conn, sql, params)
                return list(conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall())
            except psycopg.OperationalError as e:
                if self._watchdog.release(conn):
                    raise self._over_budget() from e
                if e.sqlstate is None and conn.broken:
                    raise _StaleConnectionError(str(e)) from e
                raise
            finally:
                self._watchdog.release(conn)

    def _in_tenant_transaction(
        self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]
    ) -> list[Row]:
        """The read in a transaction where the policies see the acting tenant, sent in one
        round trip. Only the read itself goes through the traced cursor: the statements
        counted per request are the reads."""
        plain = psycopg.Cursor(conn)
        try:
            with conn.pipeline():
                plain.execute("BEGIN")
                plain.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, _tenant.get()))
                cursor = conn.execute(sql.replace("?", "%s"), tuple(params))
                plain.execute("COMMIT")
            return list(cursor.fetchall())
        except psycopg.Error:
            idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if not conn.broken and not idle:
                conn.rollback()
            raise

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
