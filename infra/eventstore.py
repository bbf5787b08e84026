"""The event log: the eventsourcing library's Application over SQLite (embedded) or
PostgreSQL, configured only from Settings, with driver errors translated here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import psycopg.conninfo
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import BaseAggregate
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    Recording,
)
from eventsourcing.utils import Environment

# Importing the aggregates registers their pinned topics, so stored events decode.
from domain import api_key, forecast, receipt, scenario, tenant  # noqa: F401
from infra import errors, locks, storeguard
from infra.groupcommit import GroupCommitter
from infra.settings import Settings

A = TypeVar("A", bound=BaseAggregate[UUID])


class EventLog(Application[UUID]):
    """The one application of the service; its name is pinned because it names the
    PostgreSQL table (accubooks_events) and the library's settings prefix."""

    name = "accubooks"
    # PostgreSQL: the channel the library NOTIFYs after every insert into the events table.
    channel = "accubooks_events"

    def __init__(self, env: Any = None, *, group_commit_max: int = 0) -> None:
        super().__init__(env)
        self._listeners: list[Callable[[], None]] = []
        # 0: every command's save is its own transaction (the library's stock path).
        self._committer = (
            GroupCommitter(self._save_events, self._slot_taken, max_size=group_commit_max)
            if group_commit_max > 0
            else None
        )

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called after every save of this process (wakes in-process projection workers)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def construct_env(self, name: str, env: Any = None) -> Environment:
        # Only our Settings configure the library: stray process variables
        # (PERSISTENCE_MODULE, ACCUBOOKS_*) must not silently redirect the store.
        return Environment(name, dict(env or {}))

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        try:
            recordings = super().save(*objs, **kwargs)
        except IntegrityError as e:
            raise errors.RecordConflictError("a concurrent command saved first") from e
        except (OperationalError, InterfaceError) as e:
            raise errors.StoreUnavailableError("the event store is unavailable") from e
        for listener in list(self._listeners):
            listener()
        return recordings

    def commit(self, *aggregates: BaseAggregate[UUID]) -> list[Recording[UUID]]:
        """Saves a command's aggregates in one transaction, like save(); with group commit
        that transaction may also hold concurrent commands' events. Raises
        RecordConflictError exactly when saving these aggregates alone would."""
        if self._committer is None:
            return self.save(*aggregates)
        events = [event for aggregate in aggregates for event in aggregate.collect_events()]
        return self._committer.commit(events)

    @property
    def groups_commits(self) -> bool:
        """Whether commit() shares transactions (commit_async() needs it)."""
        return self._committer is not None

    async def commit_async(self, *aggregates: BaseAggregate[UUID]) -> list[Recording[UUID]]:
        """commit() for a coroutine (group commit only): the event loop goes on serving
        while the committer thread saves."""
        if self._committer is None:
            raise RuntimeError("commit_async() needs group commit (ACCUBOOKS_GROUP_COMMIT)")
        events = [event for aggregate in aggregates for event in aggregate.collect_events()]
        return await self._committer.commit_async(events)

    def _save_events(self, events: Sequence[Any]) -> list[Recording[UUID]]:
        return self.save(*events)

    def _slot_taken(self, event: Any) -> bool:
        version: int = event.originator_version
        try:
            return bool(
                self.recorder.select_events(
                    event.originator_id, gt=version - 1, lte=version, limit=1
                )
            )
        except (OperationalError, InterfaceError) as e:
            raise errors.StoreUnavailableError("the event store is unavailable") from e

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
        super().close()

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None:
        """The aggregate with this id if it exists and is of this kind, else None."""
        try:
            aggregate: object = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        except (OperationalError, InterfaceError) as e:
            raise errors.StoreUnavailableError("the event store is unavailable") from e
        return aggregate if isinstance(aggregate, kind) else None

    def position(self) -> int:
        """The newest position of the log (0 when empty)."""
        try:
            return self.recorder.max_notification_id() or 0
        except (OperationalError, InterfaceError) as e:
            raise errors.StoreUnavailableError("the event store is unavailable") from e

    def occurred_after(self, position: int) -> datetime | None:
        """When the first event after ``position`` happened (its timestamp); None when the
        log has nothing after it. One indexed read of one row: positions may have gaps
        (PostgreSQL sequences), so it asks for the next one rather than ``position + 1``."""
        try:
            found = self.recorder.select_notifications(
                start=position, limit=1, inclusive_of_start=False
            )
        except (OperationalError, InterfaceError) as e:
            raise errors.StoreUnavailableError("the event store is unavailable") from e
        if not found:
            return None
        # Every event class of the log derives from the library's DomainEvent, which has it.
        timestamp = getattr(self.mapper.to_domain_event(found[0]), "timestamp", None)
        return timestamp if isinstance(timestamp, datetime) else None


def library_env(settings: Settings) -> dict[str, str]:
    """The eventsourcing library's settings for our Settings."""
    if settings.database_url:
        params = psycopg.conninfo.conninfo_to_dict(settings.database_url)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": str(params.get("dbname", "")),
            "POSTGRES_HOST": str(params.get("host", "127.0.0.1")),
            "POSTGRES_PORT": str(params.get("port", "5432")),
            "POSTGRES_USER": str(params.get("user", "")),
            "POSTGRES_PASSWORD": str(params.get("password", "")),
            "POSTGRES_POOL_SIZE": str(settings.db_pool_size),
            "POSTGRES_MAX_OVERFLOW": str(settings.db_pool_max_overflow),
            "POSTGRES_CONNECT_TIMEOUT": str(max(1, round(settings.db_pool_timeout_s))),
            "POSTGRES_LOCK_TIMEOUT": str(max(1, round(settings.db_lock_timeout_s))),
        }
    os.makedirs(settings.data_dir, exist_ok=True)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": os.path.join(settings.data_dir, "events.sqlite"),
        "SQLITE_LOCK_TIMEOUT": str(max(1, round(settings.db_lock_timeout_s))),
    }


def projection_env(settings: Settings, name: str) -> dict[str, str]:
    """The library's settings for the tracking recorder of one projection: on PostgreSQL
    its tables sit beside the events (tracking table <name>_tracking) with a tiny pool;
    on SQLite each projection has its own file (the library's tracking table name is fixed).
    """
    env = library_env(settings)
    if settings.database_url:
        # A worker holds one connection at a time (its batch transaction).
        env["POSTGRES_POOL_SIZE"] = "1"
        env["POSTGRES_MAX_OVERFLOW"] = "1"
        return env
    env["SQLITE_DBNAME"] = projection_file(settings, name)
    return env


def projection_file(settings: Settings, name: str) -> str:
    folder = os.path.join(settings.data_dir, "projections")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.sqlite")


def open_event_log(settings: Settings) -> EventLog:
    """Opens (and on first use creates) the event store named by the settings."""
    try:
        with locks.schema_lock(settings):
            log = EventLog(
                env=library_env(settings),
                group_commit_max=settings.group_commit_max if settings.group_commit else 0,
            )
        if settings.database_url:
            # Fail fast while PostgreSQL is down, a fresh pool once it is back.
            storeguard.guard(log.recorder.datastore, settings.database_url)  # type: ignore[attr-defined]
        return log
    except (OperationalError, InterfaceError, psycopg.OperationalError) as e:
        raise errors.StoreUnavailableError("the event store is unavailable") from e
