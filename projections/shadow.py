"""Shadow read models, where a rebuild replays into: on PostgreSQL the projection's tables
in the schema ``accubooks_shadow`` (the library qualifies its tracking table with
POSTGRES_SCHEMA; our unqualified DDL and SQL follow the connection's search_path), on
SQLite a file ``<name>.shadow.sqlite`` beside the live one. Also the snapshot in which
a shadow and its live model are compared, and the switch from one to the other.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

from eventsourcing.persistence import InfrastructureFactory, OperationalError
from eventsourcing.utils import Environment

from infra import locks
from infra.eventstore import EventLog, projection_env, projection_file
from infra.settings import Settings
from projections import compare
from projections.compare import TableDiff, quoted
from projections.errors import RebuildError
from projections.readmodel import (
    PostgresReadModel,
    Projector,
    ReadModel,
    SQLiteReadModel,
    Tx,
    model_ddl,
)

SHADOW_SCHEMA = "accubooks_shadow"
# Where a switch moves the replaced live tables before dropping them (PostgreSQL).
RETIRED_SCHEMA = "accubooks_retired"
# A switch waits this long for readers in flight at a time, until db_lock_timeout_s.
_SWITCH_LOCK_WAIT_MS = 250


def tables_of(projector: Projector) -> list[str]:
    # With its parked events: a rebuilt model has applied them all, so a switch empties it.
    return re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", " ".join(model_ddl(projector)))


def shadow_file(settings: Settings, name: str) -> str:
    return projection_file(settings, name).removesuffix(".sqlite") + ".shadow.sqlite"


def open_shadow(settings: Settings, projector: Projector, *, fresh: bool = True) -> ReadModel:
    """An empty shadow of the projector's read model (a previous one is dropped); with
    ``fresh=False``, the shadow as it is (another process of the same rebuild made it)."""
    env = {**projection_env(settings, projector.name), "CREATE_TABLE": "n"}
    if settings.database_url:
        env["POSTGRES_SCHEMA"] = SHADOW_SCHEMA
    else:
        env["SQLITE_DBNAME"] = path = shadow_file(settings, projector.name)
        if fresh:
            _remove_sqlite(path)
    factory = InfrastructureFactory.construct(Environment(projector.name, env))
    model: ReadModel
    if settings.database_url:
        postgres = cast(PostgresReadModel, factory.tracking_recorder(PostgresReadModel))
        pool_kwargs = postgres.datastore.pool.kwargs
        assert isinstance(pool_kwargs, dict)
        # Before the pool's first connection: the projector's unqualified SQL then reaches
        # the shadow tables, on every connection of this recorder and only there.
        pool_kwargs["options"] = f"-c search_path={SHADOW_SCHEMA}"
        model = postgres
    else:
        model = cast(SQLiteReadModel, factory.tracking_recorder(SQLiteReadModel))
    model.install(projector)
    if not fresh:
        return model
    with locks.schema_lock(settings):
        if isinstance(model, PostgresReadModel):
            with model.datastore.transaction(commit=True) as cursor:
                cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted(SHADOW_SCHEMA)}")
                for table in [*tables_of(projector), model.tracking_table_name]:
                    cursor.execute(f"DROP TABLE IF EXISTS {quoted(SHADOW_SCHEMA)}.{quoted(table)}")
        model.create_table()
    return model


def _remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


class _Lent:
    """Stands in for a read model's datastore so that its own ``apply_batch`` runs inside
    a transaction the caller already has open (the snapshot's)."""

    def __init__(self, own: Any, cursor: Any) -> None:
        self._own = own
        self._cursor = cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._own, name)

    @contextlib.contextmanager
    def transaction(self, *, commit: bool) -> Iterator[Any]:
        yield self._cursor


class Snapshot:
    """One transaction on the shadow's connection that also sees the live tables, as of
    its first read of them (REPEATABLE READ on PostgreSQL; on SQLite the live file is
    attached and a read transaction keeps one snapshot of each file)."""

    def __init__(self, cursor: Any, *, postgres: bool, live: str, rebuilt: str) -> None:
        self._cursor = cursor
        self._tx = Tx(cursor, postgres=postgres)
        self._postgres = postgres
        self._live = live  # schema (PostgreSQL) or attached database (SQLite)
        self._rebuilt = rebuilt
        self.live_tracking = ""
        self.rebuilt_tracking = ""

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._tx.execute(sql, params)
        return [dict(row) for row in self._tx.fetchall()]

    def live_position(self) -> int:
        [row] = self._rows(
            f"SELECT MAX(notification_id) AS position FROM {self.live_tracking}"
            " WHERE application_name = ?",
            [EventLog.name],
        )
        return int(row["position"] or 0)

    @contextlib.contextmanager
    def lent(self, model: ReadModel) -> Iterator[None]:
        """While open, ``model.apply_batch`` writes inside this snapshot's transaction."""
        own = model.datastore
        model.datastore = _Lent(own, self._cursor)  # type: ignore[assignment]
        try:
            yield
        finally:
            model.datastore = own

    def diff(self, projector: Projector) -> list[TableDiff]:
        """Every table of the projector compared row by row, in this snapshot."""
        return [
            compare.diff_table(
                self._tx, table, postgres=self._postgres, live=self._live, rebuilt=self._rebuilt
            )
            for table in tables_of(projector)
        ]


@contextlib.contextmanager
def snapshot(live: ReadModel, rebuilt: ReadModel) -> Iterator[Snapshot]:
    """A Snapshot of ``live`` and ``rebuilt`` (which must be of the same backend); its
    transaction commits what was applied to ``rebuilt`` through ``lent``."""
    if isinstance(live, PostgresReadModel) and isinstance(rebuilt, PostgresReadModel):
        schema = _current_schema(live)
        with rebuilt.datastore.transaction(commit=True) as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snap = Snapshot(cursor, postgres=True, live=schema, rebuilt=SHADOW_SCHEMA)
            snap.live_tracking = (
                f"{quoted(live.datastore.schema)}.{quoted(live.tracking_table_name)}"
            )
            snap.rebuilt_tracking = (
                f"{quoted(rebuilt.datastore.schema)}.{quoted(rebuilt.tracking_table_name)}"
            )
            yield snap
        return
    assert isinstance(live, SQLiteReadModel) and isinstance(rebuilt, SQLiteReadModel)
    with (
        _attached(rebuilt, live.datastore.pool.db_name, "live") as conn,
        conn.transaction(commit=True) as cursor,
    ):
        snap = Snapshot(cursor, postgres=False, live="live", rebuilt="main")
        snap.live_tracking, snap.rebuilt_tracking = '"live".tracking', '"main".tracking'
        yield snap


@contextlib.contextmanager
def _attached(model: SQLiteReadModel, path: str, alias: str) -> Iterator[Any]:
    """The model's writer connection with another database file attached as ``alias``."""
    with model.datastore.get_connection(commit=True) as conn:
        with conn.transaction(commit=False) as cursor:
            cursor.execute(f"ATTACH DATABASE ? AS {quoted(alias)}", (path,))
        try:
            yield conn
        finally:
            with conn.transaction(commit=False) as cursor:
                cursor.execute(f"DETACH DATABASE {quoted(alias)}")


def _current_schema(model: PostgresReadModel) -> str:
    """Where the projector's unqualified tables are (the search_path's first schema)."""
    with model.datastore.transaction(commit=False) as cursor:
        cursor.execute("SELECT current_schema() AS schema")
        row = cursor.fetchone()
    assert row is not None
    return str(row["schema"])


def switch(settings: Settings, live: ReadModel, rebuilt: ReadModel) -> None:
    """Replaces the live read model by the rebuilt one, its tracking position included, in
    one transaction: readers see the one or the other. The caller holds the projection's
    worker lock, so no worker writes either meanwhile; the schema lock keeps processes
    that create missing read-model tables at start from doing so in the middle."""
    if isinstance(rebuilt, PostgresReadModel):
        # Fresh tables have no statistics yet; the first reads after the switch need them.
        with rebuilt.datastore.transaction(commit=True) as cursor:
            for table in [*tables_of(rebuilt.projector), rebuilt.tracking_table_name]:
                cursor.execute(f"ANALYZE {quoted(SHADOW_SCHEMA)}.{quoted(table)}")
    with locks.schema_lock(settings):
        if isinstance(live, PostgresReadModel) and isinstance(rebuilt, PostgresReadModel):
            _switch_postgres(settings, live, rebuilt)
            return
        assert isinstance(live, SQLiteReadModel) and isinstance(rebuilt, SQLiteReadModel)
        _switch_sqlite(live, rebuilt)


def _switch_postgres(
    settings: Settings, live: PostgresReadModel, rebuilt: PostgresReadModel
) -> None:
    """Moves the live tables into RETIRED_SCHEMA and the shadow's into their place (their
    indexes and constraints move with them), then drops the retired ones. Readers wait
    only for the moves (ACCESS EXCLUSIVE, bounded by a short lock_timeout that is retried
    until db_lock_timeout_s); their prepared statements are planned again by PostgreSQL."""
    schema = _current_schema(live)
    tables = tables_of(live.projector)
    moves = [(schema, t) for t in tables] + [(live.datastore.schema, live.tracking_table_name)]
    shadow_refs = [f"{quoted(SHADOW_SCHEMA)}.{quoted(t)}" for _, t in moves]
    live_refs = [f"{quoted(s)}.{quoted(t)}" for s, t in moves]
    deadline = time.monotonic() + settings.db_lock_timeout_s
    while True:
        try:
            with live.datastore.transaction(commit=True) as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = '{_SWITCH_LOCK_WAIT_MS}ms'")
                cursor.execute(
                    f"LOCK TABLE {', '.join(live_refs + shadow_refs)} IN ACCESS EXCLUSIVE MODE"
                )
                cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted(RETIRED_SCHEMA)}")
                for live_ref, shadow_ref in zip(live_refs, shadow_refs, strict=True):
                    cursor.execute(_carry_grants(live_ref, shadow_ref))
                for (_, table), ref in zip(moves, live_refs, strict=True):
                    cursor.execute(f"DROP TABLE IF EXISTS {quoted(RETIRED_SCHEMA)}.{quoted(table)}")
                    cursor.execute(f"ALTER TABLE {ref} SET SCHEMA {quoted(RETIRED_SCHEMA)}")
                for (table_schema, _), ref in zip(moves, shadow_refs, strict=True):
                    cursor.execute(f"ALTER TABLE {ref} SET SCHEMA {quoted(table_schema)}")
                for _, table in moves:
                    cursor.execute(f"DROP TABLE {quoted(RETIRED_SCHEMA)}.{quoted(table)}")
            return
        except OperationalError as e:
            if time.monotonic() >= deadline:
                raise RebuildError(
                    f"the {live.projector.name} tables stayed in use by readers for"
                    f" {settings.db_lock_timeout_s:g} s: nothing was switched"
                ) from e


def _carry_grants(live_ref: str, shadow_ref: str) -> str:
    """SELECT on the rebuilt table for every role granted it on the live one (the API's
    reader among them), so a switch never takes the readers' access away, whoever runs it."""
    return (
        "DO $$ DECLARE grantee name; BEGIN FOR grantee IN SELECT DISTINCT r.rolname"
        " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
        " JOIN pg_roles r ON r.oid = a.grantee"
        f" WHERE c.oid = '{live_ref}'::regclass AND a.privilege_type = 'SELECT'"
        " AND a.grantee <> c.relowner"
        f" LOOP EXECUTE format('GRANT SELECT ON {shadow_ref} TO %I', grantee); END LOOP; END $$"
    )


def _switch_sqlite(live: SQLiteReadModel, rebuilt: SQLiteReadModel) -> None:
    """Recreates the live tables from the projector's DDL and copies the shadow's rows and
    tracking row into them, in one transaction of the live file: readers (WAL) keep their
    snapshot until it commits, then see the new tables (SQLite prepares their statements
    again after a schema change), and are never blocked."""
    tables = tables_of(live.projector)
    path = rebuilt.datastore.pool.db_name
    with (
        _attached(live, path, "shadow") as conn,
        conn.transaction(commit=True) as cursor,
    ):
        for table in tables:
            cursor.execute(f"DROP TABLE IF EXISTS main.{quoted(table)}")
        for statement in model_ddl(live.projector):
            cursor.execute(statement)  # unqualified: main, the live file
        for table in tables:
            cursor.execute("SELECT name FROM pragma_table_info(?, 'shadow') ORDER BY cid", (table,))
            columns = ", ".join(quoted(row["name"]) for row in cursor.fetchall())
            cursor.execute(
                f"INSERT INTO main.{quoted(table)} ({columns})"
                f" SELECT {columns} FROM shadow.{quoted(table)}"
            )
        cursor.execute("DELETE FROM main.tracking")
        cursor.execute(
            "INSERT INTO main.tracking (application_name, notification_id)"
            " SELECT application_name, notification_id FROM shadow.tracking"
        )
    rebuilt.datastore.close()
    _remove_sqlite(path)


def tenants(live: ReadModel, rebuilt: ReadModel) -> list[str]:
    """Every tenant with a row in either copy (tables with a tenant_id column)."""
    selects: list[str] = []
    if isinstance(live, PostgresReadModel):
        schema = _current_schema(live)
        with live.datastore.transaction(commit=False) as cursor:
            for table in tables_of(live.projector):
                cursor.execute(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = %s"
                    " AND table_name = %s AND column_name = 'tenant_id'",
                    (schema, table),
                )
                if cursor.fetchone():
                    selects += [
                        f"SELECT tenant_id FROM {quoted(s)}.{quoted(table)}"
                        for s in (schema, SHADOW_SCHEMA)
                    ]
            if not selects:
                return []
            cursor.execute(" UNION ".join(selects))
            return sorted(str(row["tenant_id"]) for row in cursor.fetchall())
    assert isinstance(live, SQLiteReadModel) and isinstance(rebuilt, SQLiteReadModel)
    with (
        _attached(live, rebuilt.datastore.pool.db_name, "shadow") as conn,
        conn.transaction(commit=False) as cursor,
    ):
        for table in tables_of(live.projector):
            cursor.execute("SELECT 1 FROM pragma_table_info(?) WHERE name = 'tenant_id'", (table,))
            if cursor.fetchone():
                selects += [
                    f"SELECT tenant_id FROM {s}.{quoted(table)}" for s in ("main", "shadow")
                ]
        if not selects:
            return []
        cursor.execute(" UNION ".join(selects))
        return sorted(str(row["tenant_id"]) for row in cursor.fetchall())
