"""Read-model storage. Each projection keeps its tables behind one of the eventsourcing
library's tracking recorders, so the rows of a batch and the position they reach commit
in one transaction: every event is applied exactly once, and a second worker that tried
to apply the same batch would fail on the tracking row and roll back. Beside its own
tables, every read model has ``<name>_parked``: the events its projector failed on, each
recorded in the transaction that moved the position past it (see projections.parking).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import msgspec
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import InfrastructureFactory, Notification, Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.sqlite import SQLiteTrackingRecorder
from eventsourcing.utils import Environment
from psycopg.conninfo import conninfo_to_dict
from psycopg.sql import SQL, Composed

from infra import locks, readstore, storeguard
from infra.eventstore import EventLog, projection_env
from infra.settings import Settings
from projections.errors import NotParkedError

Positioned = tuple[DomainEventProtocol[Any], int]


# The text forms below are cached: every read model formats the same ids and times of
# the same events again (a rebuild hands one decoded event to all of them), and
# formatting costs more than a lookup. Equal values format equally (aware datetimes
# equal as instants), so a cached answer is the answer.
_FORMATTED = 1 << 16


@functools.lru_cache(maxsize=_FORMATTED)
def iso(moment: datetime) -> str:
    """Fixed-width UTC RFC 3339, so text order is time order (keyset paging relies on it)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=_FORMATTED)
def month_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


@functools.lru_cache(maxsize=_FORMATTED)
def id_text(value: object) -> str:
    """An id (a UUID) as stored in read-model rows: ``str(value)``."""
    return str(value)


class Tx:
    """One transaction's cursor with portable SQL: write ``?`` placeholders everywhere."""

    def __init__(self, cursor: Any, *, postgres: bool) -> None:
        self._cursor = cursor
        self._postgres = postgres

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(self._sql(sql), [tuple(row) for row in rows])

    def insert_rows(
        self,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
        suffix: str = "",
    ) -> None:
        """Inserts ``rows`` (values in the order of ``columns``, each a name and its
        PostgreSQL type) with one statement per batch on PostgreSQL: the rows travel as one
        array per column and ``unnest`` turns them back into rows, so the server plans
        and runs one INSERT instead of one per row. ``suffix`` (an ON CONFLICT clause)
        applies to every row; the rows' keys must then be distinct, as PostgreSQL
        refuses to change one row twice in a statement."""
        if not rows:
            return
        names = ", ".join(name for name, _ in columns)
        if not self._postgres:
            marks = ",".join("?" * len(columns))
            self.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks}) {suffix}", rows)
            return
        arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
        self._cursor.execute(
            f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) {suffix}",
            [list(column) for column in zip(*rows, strict=True)],
        )

    def update_rows(
        self,
        table: str,
        changed: Sequence[tuple[str, str]],
        keys: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """``UPDATE table SET changed... WHERE keys...`` for many rows (each the changed
        values, then the key values); one statement on PostgreSQL, as ``insert_rows``.
        Keys must be distinct: an UPDATE joined to two rows of one key keeps either."""
        if not rows:
            return
        if not self._postgres:
            sets = ", ".join(f"{name} = ?" for name, _ in changed)
            where = " AND ".join(f"{name} = ?" for name, _ in keys)
            self.executemany(f"UPDATE {table} SET {sets} WHERE {where}", rows)
            return
        columns = [*changed, *keys]
        arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
        aliases = ", ".join(f"u_{name}" for name, _ in columns)
        sets = ", ".join(f"{name} = u.u_{name}" for name, _ in changed)
        where = " AND ".join(f"t.{name} = u.u_{name}" for name, _ in keys)
        self._cursor.execute(
            f"UPDATE {table} AS t SET {sets} FROM unnest({arrays}) AS u({aliases}) WHERE {where}",
            [list(column) for column in zip(*rows, strict=True)],
        )

    def delete_in(self, table: str, column: str, values: Sequence[str]) -> None:
        """Deletes the rows whose text ``column`` is one of ``values``."""
        if not values:
            return
        if self._postgres:
            self._cursor.execute(
                f"DELETE FROM {table} WHERE {column} = ANY(%b::text[])", [list(values)]
            )
        else:
            self.executemany(f"DELETE FROM {table} WHERE {column} = ?", [[v] for v in values])

    def fetchall(self) -> list[Mapping[str, Any]]:
        rows: list[Mapping[str, Any]] = self._cursor.fetchall()
        return rows

    def select_in(
        self, sql_before_in: str, values: Sequence[Any], chunk: int = 500
    ) -> list[Mapping[str, Any]]:
        """Rows of ``<sql_before_in> IN (...)`` for many values, in bounded chunks."""
        rows: list[Mapping[str, Any]] = []
        for start in range(0, len(values), chunk):
            part = values[start : start + chunk]
            self.execute(f"{sql_before_in} IN ({','.join('?' * len(part))})", part)
            rows.extend(self.fetchall())
        return rows


def _pipelined(cursor: Any, *, postgres: bool) -> contextlib.AbstractContextManager[Any]:
    """PostgreSQL: sends a batch's statements without waiting for each one's answer
    (pipeline mode); only a read (``fetchall``) waits, and the rest is answered at once at
    the end. A round trip costs the most on a busy machine (the server's process and
    ours each wait to be scheduled), and a batch writes several tables. An error still
    surfaces before the transaction commits, and rolls it back whole."""
    if not postgres:
        return contextlib.nullcontext()
    pipeline: contextlib.AbstractContextManager[Any] = cursor.connection.pipeline()
    return pipeline


class Projector(Protocol):
    """A read model: its name (= tracking name = table prefix), tables, and how a batch of
    events changes them."""

    name: ClassVar[str]

    def ddl(self) -> list[str]: ...

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None: ...


class StoredEventProjector(Projector, Protocol):
    """A read model that needs the events as stored (their exact bytes), not only as
    decoded: the audit chain hashes what the store holds."""

    def apply_stored(
        self, tx: Tx, events: Sequence[tuple[DomainEventProtocol[Any], Notification]]
    ) -> None: ...


class ParkedEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An event a projection skipped because its projector kept failing on it."""

    projection: str
    position: int
    aggregate_id: str
    aggregate_version: int
    topic: str
    error_type: str
    error_message: str
    # When the first attempt of a batch holding it failed (RFC 3339, UTC).
    first_failed_at: str
    # Failed attempts before it was parked (the batch's, then its own).
    attempts: int


_PARKED_COLUMNS = (
    "position, aggregate_id, aggregate_version, topic, error_type, error_message,"
    " first_failed_at, attempts"
)


def parked_table(name: str) -> str:
    return f"{name}_parked"


def model_ddl(projector: Projector) -> list[str]:
    """Every table of the projector's read model: its own and its parked events'."""
    return [
        *projector.ddl(),
        f"CREATE TABLE IF NOT EXISTS {parked_table(projector.name)} ("
        " position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL,"
        " aggregate_version BIGINT NOT NULL, topic TEXT NOT NULL, error_type TEXT NOT NULL,"
        " error_message TEXT NOT NULL, first_failed_at TEXT NOT NULL,"
        " attempts INTEGER NOT NULL)",
    ]


# Row-level security (PostgreSQL): the policy every table holding tenants' rows gets. The
# projections write as the tables' owner, which policies do not bind; the API's
# tenant-scoped reads run as another role, with the tenant set per transaction (see
# infra/readstore.py), and see that tenant's rows only. Unset, the setting hides them all.
TENANT_POLICY = "tenant_rows"
_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*)\)", re.DOTALL)


def tenant_tables(projector: Projector) -> list[str]:
    """The projector's tables that hold tenants' rows: those with a tenant_id column. Found
    from the DDL, so a table added later is covered without anyone remembering to."""
    found = []
    for sql in projector.ddl():
        table = _CREATE_TABLE.match(sql)
        if table and re.search(r"\btenant_id\b", table.group(2)):
            found.append(table.group(1))
    return found


def reader_role(settings: Settings) -> str | None:
    """The role of READ_DATABASE_URL, which the read models grant SELECT on their tenant
    tables (only those, and the positions) to."""
    if not settings.read_database_url:
        return None
    role = conninfo_to_dict(settings.read_database_url).get("user")
    if not isinstance(role, str) or not readstore.READER_ROLE_NAME.fullmatch(role):
        raise ValueError(
            "READ_DATABASE_URL must name its role (user) in lower-case letters, digits and _"
        )
    return role


def tenancy_ddl(projector: Projector, tracking_table: str, reader: str | None) -> list[str]:
    """Row-level security on the projector's tenant tables, and the reader's grants; each
    only when missing, so a process starting takes no table lock for nothing."""
    statements = []
    for table in tenant_tables(projector):
        grant = (
            f"IF NOT has_table_privilege('{reader}', '{table}', 'SELECT') THEN"
            f" GRANT SELECT ON {table} TO {reader}; END IF;"
            if reader
            else ""
        )
        statements.append(
            "DO $$ BEGIN"
            f" IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = '{table}'::regclass) THEN"
            f" ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; END IF;"
            " IF NOT EXISTS (SELECT 1 FROM pg_policy"
            f" WHERE polrelid = '{table}'::regclass AND polname = '{TENANT_POLICY}') THEN"
            f" CREATE POLICY {TENANT_POLICY} ON {table} FOR SELECT"
            f" USING (tenant_id = current_setting('{readstore.TENANT_SETTING}', true)); END IF;"
            f" {grant} END $$"
        )
    if reader:
        # Reads give their position in the same statement.
        statements.append(
            f"DO $$ BEGIN IF NOT has_table_privilege('{reader}', '{tracking_table}', 'SELECT')"
            f" THEN GRANT SELECT ON {tracking_table} TO {reader}; END IF; END $$"
        )
    return statements


class _ReadModel:
    projector: Projector
    is_postgres: bool

    def apply_batch(
        self,
        events: Sequence[Positioned],
        position: int,
        notifications: Sequence[Notification] | None = None,
        *,
        parked: ParkedEvent | None = None,
    ) -> None:
        """Applies ``events`` and moves the tracking position to ``position`` atomically.
        ``notifications`` are the same events as stored (needed by a
        StoredEventProjector). With ``parked`` (the event at ``position``, after
        ``events``), records it as parked instead of applying it: the position moves past
        it exactly once, and it is never lost. The tracking row is written first: it takes
        the write lock at once, and a stale position (another worker got there first)
        fails before any row changes."""
        with (
            self.datastore.transaction(commit=True) as cursor,  # type: ignore[attr-defined]
            _pipelined(cursor, postgres=self.is_postgres),
        ):
            if self.is_postgres:
                # A view and its position are lost or kept together, so a crash may only
                # replay a batch: the durability of every event is the log's, not ours.
                cursor.execute("SET LOCAL synchronous_commit = off")
                # Statements are prepared after a few runs; a generic plan made while the
                # tables were small would keep scanning the wrong index as they grow.
                cursor.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            self._insert_tracking(cursor, Tracking(EventLog.name, position))  # type: ignore[attr-defined]
            tx = Tx(cursor, postgres=self.is_postgres)
            if events:
                self._apply(tx, events, notifications)
            if parked is not None:
                tx.execute(
                    f"INSERT INTO {parked_table(self.projector.name)} ({_PARKED_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        parked.position,
                        parked.aggregate_id,
                        parked.aggregate_version,
                        parked.topic,
                        parked.error_type,
                        parked.error_message,
                        parked.first_failed_at,
                        parked.attempts,
                    ],
                )

    def apply_parked(self, event: Positioned, notification: Notification) -> None:
        """Applies a parked event now (after the events that followed it) and removes its
        parked row, in one transaction; the tracking position stays where it is. Its row
        is deleted first (PostgreSQL: after locking the tracking table), which orders
        this transaction with a live worker's batches: they write the tracking row first."""
        name = self.projector.name
        with self.datastore.transaction(commit=True) as cursor:  # type: ignore[attr-defined]
            tx = Tx(cursor, postgres=self.is_postgres)
            if self.is_postgres:
                tx.execute(f"LOCK TABLE {self.tracking_table_name} IN EXCLUSIVE MODE")  # type: ignore[attr-defined]
            tx.execute(
                f"DELETE FROM {parked_table(name)} WHERE position = ? RETURNING position",
                [event[1]],
            )
            if not tx.fetchall():
                # Replayed meanwhile by someone else (or never parked): never apply twice.
                raise NotParkedError(f"no event is parked at {event[1]} in {name}")
            self._apply(tx, [event], [notification])

    def parked(self) -> list[ParkedEvent]:
        """The events parked by this read model, by position."""
        name = self.projector.name
        with self.datastore.transaction(commit=False) as cursor:  # type: ignore[attr-defined]
            tx = Tx(cursor, postgres=self.is_postgres)
            tx.execute(f"SELECT {_PARKED_COLUMNS} FROM {parked_table(name)} ORDER BY position")
            return [ParkedEvent(projection=name, **row) for row in map(dict, tx.fetchall())]

    def _apply(
        self, tx: Tx, events: Sequence[Positioned], notifications: Sequence[Notification] | None
    ) -> None:
        apply_stored = getattr(self.projector, "apply_stored", None)
        if apply_stored is None:
            self.projector.apply(tx, events)
        elif notifications is None:
            raise ValueError(f"the {self.projector.name} read model needs the stored events")
        else:
            pairs = zip(events, notifications, strict=True)
            apply_stored(tx, [(event, stored) for (event, _), stored in pairs])

    def position(self) -> int:
        found: int | None = self.max_tracking_id(EventLog.name)  # type: ignore[attr-defined]
        return found or 0


class PostgresReadModel(_ReadModel, PostgresTrackingRecorder):
    is_postgres = True

    def install(self, projector: Projector, *, reader: str | None = None) -> None:
        """The projector's tables, under row-level security, SELECT granted to ``reader``."""
        self.projector = projector
        ddl = [*model_ddl(projector), *tenancy_ddl(projector, self.tracking_table_name, reader)]
        self.sql_create_statements.extend(Composed([SQL(sql)]) for sql in ddl)


class SQLiteReadModel(_ReadModel, SQLiteTrackingRecorder):
    is_postgres = False

    def install(self, projector: Projector, *, reader: str | None = None) -> None:
        self.projector = projector
        self.create_table_statements.extend(model_ddl(projector))


ReadModel = PostgresReadModel | SQLiteReadModel


def open_read_model(settings: Settings, projector: Projector) -> ReadModel:
    """The projection's recorder, its tables created if missing."""
    env = {**projection_env(settings, projector.name), "CREATE_TABLE": "n"}
    factory = InfrastructureFactory.construct(Environment(projector.name, env))
    model: ReadModel
    if settings.database_url:
        model = factory.tracking_recorder(PostgresReadModel)  # type: ignore[assignment]
    else:
        model = factory.tracking_recorder(SQLiteReadModel)  # type: ignore[assignment]
    model.install(projector, reader=reader_role(settings))
    if settings.database_url:
        # Fail fast while PostgreSQL is down, a fresh pool once it is back (the worker
        # retries meanwhile; the library's pool backoff would otherwise hold it for minutes).
        storeguard.guard(model.datastore, settings.database_url, name=f"{projector.name} store")
    with locks.schema_lock(settings):
        model.create_table()
    return model
