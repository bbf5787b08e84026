"""Connections for the read side: read models are queried with one statement per request,
through a pool of autocommit connections (PostgreSQL) or per-thread read-only connections
to each projection's file (SQLite). Tests hook ``on_statement`` to count statements.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from infra import errors
from infra.eventstore import projection_file
from infra.settings import Settings

Row = Mapping[str, Any]


class ReadStore:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.postgres = bool(settings.database_url)
        self.on_statement: Callable[[str], None] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sqlite_connections: list[sqlite3.Connection] = []
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
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
                },
                open=True,
                name="readstore",
            )

    def tracking_table(self, projection: str) -> str:
        """Where a projection's position is kept (the library names it per backend)."""
        return f"{projection}_tracking" if self.postgres else "tracking"

    def query(self, projection: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Runs one statement against a projection's tables (``?`` placeholders)."""
        try:
            if self._pool is not None:
                with self._pool.connection() as conn:
                    return list(conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall())
            return list(self._sqlite(projection).execute(sql, tuple(params)).fetchall())
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, sqlite3.OperationalError) as e:
            raise errors.StoreUnavailableError("the read models are unavailable") from e

    def _sqlite(self, projection: str) -> sqlite3.Connection:
        connections: dict[str, sqlite3.Connection] = self._local.__dict__.setdefault("c", {})
        conn = connections.get(projection)
        if conn is None:
            path = projection_file(self._settings, projection)
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.set_trace_callback(self._trace)
            connections[projection] = conn
            with self._lock:
                self._sqlite_connections.append(conn)
        return conn

    def _trace(self, statement: str) -> None:
        # The drivers' own hooks see every statement really sent, whoever issued it.
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
        if self._pool is not None:
            self._pool.close()
        with self._lock:
            for conn in self._sqlite_connections:
                conn.close()
            self._sqlite_connections.clear()
