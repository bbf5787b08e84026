"""Cross-process locks: a PostgreSQL advisory lock key per purpose, and the lock that
serialises table creation."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator

import psycopg

from infra.settings import Settings


def lock_key(purpose: str) -> int:
    """A stable 64-bit advisory lock key for ``purpose`` (e.g. "projection.scenarios")."""
    digest = hashlib.sha256(f"accubooks.{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def schema_lock(settings: Settings) -> Iterator[None]:
    """Serialises table creation across processes: the library creates tables (and, on
    PostgreSQL, replaces a function) every time a store is opened, and two processes
    doing so at once collide in the catalogue."""
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (lock_key("schema"),))
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key("schema"),))
        return
    os.makedirs(settings.data_dir, exist_ok=True)
    with open(os.path.join(settings.data_dir, "schema.lock"), "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
