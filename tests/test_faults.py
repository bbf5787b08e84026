"""The fault tools do what they claim: a private Redis dies and comes back on its port,
and the proxy forwards, delays, black-holes, resets and corrupts real traffic."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults import PrivateRedis, TcpProxy, private_redis
from tests.services import ADMIN_URL, unavailable


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.fixture
def proxy(redis_server: PrivateRedis) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", redis_server.port) as running:
        yield running


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    # Explicitly no retries: each fault must show on the call that meets it.
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def timed_get(client: redis.Redis, key: str) -> float:
    started = time.monotonic()
    client.get(key)
    return time.monotonic() - started


def test_private_redis_is_not_the_shared_one(redis_server: PrivateRedis) -> None:
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis_client(redis_server.url, 1.0) as client:
        assert client.dbsize() == 0


def test_proxy_forwards_commands_and_counts_them(
    redis_server: PrivateRedis, proxy: TcpProxy
) -> None:
    url = proxy.url_for(redis_server.url)
    assert url == f"redis://127.0.0.1:{proxy.port}/0"
    with redis_client(url, 1.0) as client:
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
    assert proxy.connections_accepted == 1
    assert proxy.bytes_to_target == proxy.bytes_from_clients > 0
    assert proxy.bytes_to_clients == proxy.bytes_from_target > 0


def test_url_for_keeps_user_database_and_query(proxy: TcpProxy) -> None:
    rewritten = proxy.url_for("postgresql://app:secret@db.internal:5432/books?sslmode=disable")
    assert rewritten == f"postgresql://app:secret@127.0.0.1:{proxy.port}/books?sslmode=disable"
    with pytest.raises(ValueError, match="not a redis"):
        proxy.url_for("http://127.0.0.1:80/")


def test_delay_holds_every_chunk_in_both_directions(
    redis_server: PrivateRedis, proxy: TcpProxy
) -> None:
    with redis_client(proxy.url_for(redis_server.url), 2.0) as client:
        client.set("k", "v")
        proxy.delay(0.3)
        # The request is held 0.3 s on its way in, the answer 0.3 s on its way out.
        assert 0.6 <= timed_get(client, "k") < 1.5
        proxy.forward()
        assert timed_get(client, "k") < 0.3


def test_blackhole_times_a_call_out_and_keeps_the_connection(
    redis_server: PrivateRedis, proxy: TcpProxy
) -> None:
    with redis_client(proxy.url_for(redis_server.url), 0.5) as client:
        client.ping()
        sent = proxy.bytes_to_target
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.get("k")
        assert 0.45 <= time.monotonic() - started < 1.0
        assert proxy.bytes_from_clients > sent == proxy.bytes_to_target
    # redis-py drops a connection that timed out; the proxy itself closes nothing.
    with socket.create_connection(proxy.address, timeout=0.2) as held:
        held.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            held.recv(64)
        assert proxy.connections_open == 1


def test_reset_fails_open_and_new_connections_at_once(
    redis_server: PrivateRedis, proxy: TcpProxy
) -> None:
    url = proxy.url_for(redis_server.url)
    with redis_client(url, 2.0) as client, redis_client(url, 2.0) as newcomer:
        client.ping()
        proxy.reset()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        with pytest.raises(redis.ConnectionError):
            newcomer.ping()
        assert time.monotonic() - started < 0.5
        proxy.forward()
        assert newcomer.ping() is True


def test_garbage_from_the_target_is_a_protocol_error(
    redis_server: PrivateRedis, proxy: TcpProxy
) -> None:
    with redis_client(proxy.url_for(redis_server.url), 1.0) as client:
        client.ping()
        proxy.garbage(b"?not redis\r\n")
        with pytest.raises(redis.exceptions.InvalidResponse):
            client.get("k")


def test_stopped_redis_refuses_then_starts_empty_on_the_same_port(
    redis_server: PrivateRedis,
) -> None:
    port = redis_server.port
    with redis_client(redis_server.url, 1.0) as client:
        client.set("k", "v")
        redis_server.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        redis_server.start()
        assert redis_server.port == port
        assert client.get("k") is None


def test_proxy_exit_closes_its_connections_within_a_second(redis_server: PrivateRedis) -> None:
    with socket.socket() as held:
        held.settimeout(2.0)
        with TcpProxy("127.0.0.1", redis_server.port) as proxy:
            held.connect(proxy.address)
            held.sendall(b"PING\r\n")
            assert held.recv(64) == b"+PONG\r\n"
            started = time.monotonic()
        assert time.monotonic() - started < 1.0
        assert held.recv(64) == b""


def test_proxy_forwards_and_delays_postgres() -> None:
    admin = urlsplit(ADMIN_URL)
    with TcpProxy(admin.hostname or "127.0.0.1", admin.port or 5432) as proxy:
        try:
            conn = psycopg.connect(proxy.url_for(ADMIN_URL), connect_timeout=3, autocommit=True)
        except psycopg.OperationalError as e:
            unavailable("PostgreSQL", e)
            return
        with conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.delay(0.2)
            started = time.monotonic()
            assert conn.execute("SELECT 2").fetchone() == (2,)
            # The query is held on its way in, the rows on their way out.
            assert time.monotonic() - started >= 0.4
