"""Coordination of projection workers across processes: one active worker per projection
(a PostgreSQL advisory lock, or a file lock beside the SQLite files), and a wake-up when
the log grows (PostgreSQL LISTEN on the library's NOTIFY channel; in-process signals and
polling on SQLite, which has no notifications).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from typing import IO, Protocol

import psycopg

from infra import locks
from infra.eventstore import EventLog
from infra.settings import Settings

logger = logging.getLogger("accubooks.coordination")

_LOCK_RETRY_S = 0.5


class Waiter(Protocol):
    def wait(self, timeout_s: float) -> None:
        """Returns when the log may have grown, or after ``timeout_s`` at the latest."""

    def close(self) -> None: ...


@contextlib.contextmanager
def exclusive_worker(settings: Settings, name: str, stop: threading.Event) -> Iterator[bool]:
    """Holds the projection's lock while the block runs; yields False when ``stop`` was
    set before the lock could be taken (another worker holds it meanwhile)."""
    if settings.database_url:
        with _advisory_lock(settings.database_url, name, stop) as held:
            yield held
    else:
        with _file_lock(
            os.path.join(settings.data_dir, "projections", f"{name}.lock"), stop
        ) as held:
            yield held


@contextlib.contextmanager
def _advisory_lock(url: str, name: str, stop: threading.Event) -> Iterator[bool]:
    # The lock lives as long as this session: a killed worker releases it with its socket.
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (locks.lock_key(f"projection.{name}"),)
            ).fetchone()
            if row and row[0]:
                yield True
                return
            stop.wait(_LOCK_RETRY_S)
        yield False


@contextlib.contextmanager
def _file_lock(path: str, stop: threading.Event) -> Iterator[bool]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle: IO[bytes] = open(path, "ab")  # noqa: SIM115 (held across the yield)
    try:
        while not stop.is_set():
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                stop.wait(_LOCK_RETRY_S)
                continue
            yield True
            return
        yield False
    finally:
        handle.close()


class _ListenWaiter:
    """Waits on PostgreSQL notifications of the events table (sent by every save)."""

    def __init__(self, url: str, channel: str) -> None:
        self._conn = psycopg.connect(url, autocommit=True)
        self._conn.execute(f'LISTEN "{channel}"')

    def wait(self, timeout_s: float) -> None:
        for _ in self._conn.notifies(timeout=timeout_s, stop_after=1):
            pass

    def close(self) -> None:
        self._conn.close()


class _SignalWaiter:
    """Wakes when this process saved events; other writers are caught by the timeout."""

    def __init__(self, log: EventLog) -> None:
        self._event = threading.Event()
        self._log = log
        log.add_listener(self._event.set)

    def wait(self, timeout_s: float) -> None:
        self._event.wait(timeout_s)
        self._event.clear()

    def close(self) -> None:
        self._log.remove_listener(self._event.set)


def log_waiter(settings: Settings, log: EventLog) -> Waiter:
    if settings.database_url:
        return _ListenWaiter(settings.database_url, log.channel)
    return _SignalWaiter(log)
