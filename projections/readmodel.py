"""Read-model storage. Each projection keeps its tables behind one of the eventsourcing
library's tracking recorders, so the rows of a batch and the position they reach commit
in one transaction: every event is applied exactly once, and a second worker that tried
to apply the same batch would fail on the tracking row and roll back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import InfrastructureFactory, Notification, Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.sqlite import SQLiteTrackingRecorder
from eventsourcing.utils import Environment
from psycopg.sql import SQL, Composed

from infra import locks
from infra.eventstore import EventLog, projection_env
from infra.settings import Settings

Positioned = tuple[DomainEventProtocol[Any], int]


def iso(moment: datetime) -> str:
    """Fixed-width UTC RFC 3339, so text order is time order (keyset paging relies on it)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def month_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


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


class _ReadModel:
    projector: Projector
    is_postgres: bool

    def apply_batch(
        self,
        events: Sequence[Positioned],
        position: int,
        notifications: Sequence[Notification] | None = None,
    ) -> None:
        """Applies ``events`` and moves the tracking position to ``position`` atomically.
        ``notifications`` are the same events as stored (needed by a
        StoredEventProjector). The tracking row is written first: it takes the write lock
        at once, and a stale position (another worker got there first) fails before any
        row changes."""
        with self.datastore.transaction(commit=True) as cursor:  # type: ignore[attr-defined]
            if self.is_postgres:
                # A view and its position are lost or kept together, so a crash may only
                # replay a batch: the durability of every event is the log's, not ours.
                cursor.execute("SET LOCAL synchronous_commit = off")
                # Statements are prepared after a few runs; a generic plan made while the
                # tables were small would keep scanning the wrong index as they grow.
                cursor.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            self._insert_tracking(cursor, Tracking(EventLog.name, position))  # type: ignore[attr-defined]
            tx = Tx(cursor, postgres=self.is_postgres)
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

    def install(self, projector: Projector) -> None:
        self.projector = projector
        self.sql_create_statements.extend(Composed([SQL(sql)]) for sql in projector.ddl())


class SQLiteReadModel(_ReadModel, SQLiteTrackingRecorder):
    is_postgres = False

    def install(self, projector: Projector) -> None:
        self.projector = projector
        self.create_table_statements.extend(projector.ddl())


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
    model.install(projector)
    with locks.schema_lock(settings):
        model.create_table()
    return model
