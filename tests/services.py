"""The real services tests use: a private PostgreSQL database per test, dropped
afterwards, and a real uvicorn server for an app. A service that is down skips its tests
locally and fails them under CI=true."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import uvicorn
from starlette.types import ASGIApp

from service.draining import SheddingProtocol

ADMIN_URL = os.environ.get(
    "ACCUBOOKS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def unavailable(service: str, error: Exception) -> None:
    """Skip locally; under CI a missing service is a failure, never a silent skip."""
    message = f"{service} is not available: {error}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database (test_<random>) on the shared server; its URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        unavailable("PostgreSQL", e)
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    params["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# For a Hypothesis test that serves the app in its own process: the server's threads draw
# on the global `random` (psycopg_pool jitters connections' lifetimes with it). Hypothesis
# takes a change of that state while it draws an example for a strategy that used
# `random`, and warns; with warnings as errors, a pool that happened to open a connection
# just then failed the example once and not on its replay ("unreliable results", CI on
# PostgreSQL). The tests themselves draw nothing from `random`.
SERVER_THREADS_DRAW_ON_RANDOM = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)


# A hung server fails the test instead of hanging the suite.
SERVER_DEADLINE_S = 30.0


@contextmanager
def serving(app: ASGIApp, *, http: type[asyncio.Protocol] = SheddingProtocol) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free port, in a background thread; its URL.
    Its protocol is the API processes' own unless ``http`` names another."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws="none", http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SERVER_DEADLINE_S
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it started"
            assert time.monotonic() < deadline, "uvicorn did not start in time"
            thread.join(timeout=0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SERVER_DEADLINE_S)
        assert not thread.is_alive(), "uvicorn did not stop in time"
