"""Where the read cache keeps its entries: Redis (REDIS_URL), shared by every process of a
deployment, or a bounded in-process store for the embedded process.

Both keep two kinds of keys: entries (a cached answer, with a TTL) and per-tenant,
per-read-model generations (no TTL). The projection workers bump a tenant's generation
after each batch they commit; an entry is valid only under the generation it was read
under, so invalidation is one cheap write per tenant and batch, never a scan of keys.

With Redis, every bump is also published on one channel (bump_channel); each API process
keeps a copy of the generations it has seen, updated from that channel (GenerationFeed),
so that a read can be answered from the process's memory without a round trip, for as
long as the subscription is known to be alive (readapi.cache).

Redis is a helper, never a dependency: each call has a budget (connect, send and answer
together), the client never retries, and a circuit breaker makes calls fail at once
while Redis keeps failing, so a read pays almost nothing for a dead cache. Every failure
surfaces as CacheUnavailableError, which the read path treats as a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol, TypeVar
from uuid import UUID

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from infra import metrics
from infra.errors import InfraError
from infra.settings import Settings

logger = logging.getLogger("accubooks.cache")
T = TypeVar("T")


class CacheUnavailableError(InfraError):
    """Raised when the cache cannot answer within its budget (or its breaker is open).
    Never reaches a client: the read is served from the database instead."""

    code = "CACHE_UNAVAILABLE"


class Breaker:
    """A circuit breaker: after ``failures`` consecutive failures it opens for
    ``open_s``; then one call is let through (half-open) and its outcome closes or
    reopens it. Thread-safe (the API's event loop and projection threads share it)."""

    def __init__(
        self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if not self._trial and self._clock() - self._opened_at >= self._open_s:
                self._trial = True
                return True
            return False

    def succeeded(self) -> None:
        if self._failures or self._opened_at is not None:
            with self._lock:
                if self._opened_at is not None:
                    logger.warning("cache is back: closing the circuit breaker")
                self._failures = 0
                self._opened_at = None
                self._trial = False

    def abandoned(self) -> None:
        """A call let through ended without a verdict (it was cancelled)."""
        with self._lock:
            self._trial = False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial = False
            if self._failures >= self._threshold:
                if self._opened_at is None:
                    logger.warning(
                        "cache failed %d times in a row: opening the circuit breaker",
                        self._failures,
                    )
                self._opened_at = self._clock()


class CacheStore(Protocol):
    """The read path's view of a cache (awaited on the event loop)."""

    @property
    def unavailable(self) -> bool:
        """True while the cache is known to be failing (its breaker is open)."""
        ...

    async def read(self, generation_key: str, entry_key: str) -> tuple[bytes | None, bytes | None]:
        """The tenant's current generation and the entry, in one round trip."""
        ...

    async def start_generation(self, generation_key: str) -> bytes:
        """The generation, created if missing (a fresh value no old entry carries)."""
        ...

    async def write(self, entry_key: str, value: bytes, ttl_s: float) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class GenerationBumper(Protocol):
    """The projection workers' view of a cache (called from their threads)."""

    def bump(self, generation_keys: Collection[str]) -> None:
        """Makes every entry read under these generations invalid."""
        ...


# uvloop's transports raise RuntimeError ("the handler is closed") when the client writes
# to a connection that was reset underneath it: for a cache call, a failure like the others
# (these tuples only ever guard calls into the Redis client).
_CACHE_ERRORS = (redis.RedisError, OSError, TimeoutError, RuntimeError)


def generation_key(prefix: str, tenant_id: UUID, projection: str) -> str:
    return f"{prefix}{tenant_id}:{projection}:gen"


def entry_key(prefix: str, tenant_id: UUID, projection: str, name: str) -> str:
    """Every key of a tenant starts with the prefix and the tenant's id."""
    return f"{prefix}{tenant_id}:{projection}:{name}"


class Invalidator:
    """Bumps the generations of the tenants a committed batch touched. A bump that
    fails (Redis down) is kept and retried with the next batch or idle moment, so an
    entry can outlive its data only while Redis cannot take writes at all (and then
    nobody can read it either) or until its TTL."""

    def __init__(self, bumper: GenerationBumper, prefix: str) -> None:
        self._bumper = bumper
        self._prefix = prefix
        self._lock = threading.Lock()
        self._pending: set[str] = set()

    def committed(self, projection: str, tenant_ids: Collection[UUID]) -> None:
        keys = {generation_key(self._prefix, t, projection) for t in tenant_ids}
        with self._lock:
            self._pending |= keys
        self.flush()

    def flush(self) -> None:
        with self._lock:
            keys, self._pending = self._pending, set()
        if not keys:
            return
        try:
            self._bumper.bump(keys)
        except CacheUnavailableError as e:
            logger.warning("cache invalidation of %d tenant(s) postponed: %s", len(keys), e)
            with self._lock:
                self._pending |= keys


def bump_channel(prefix: str) -> str:
    """The pub/sub channel on which every bump is announced."""
    return f"{prefix}generations"


# KEYS: generation keys; ARGV: the channel, a fresh generation. Publishes one line per
# key, "<key> <new value>" (keys never contain spaces or newlines: prefix, uuid, name).
# The new value is read back as a string: INCR's reply is a Lua number (a double), which
# would print a clock-sized generation as 1.7959647333915e+18 and lose the announcement.
_BUMP_SCRIPT = """
local lines = {}
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2], 'NX')
  redis.call('INCR', key)
  lines[i] = key .. ' ' .. redis.call('GET', key)
end
redis.call('PUBLISH', ARGV[1], table.concat(lines, '\\n'))
return #lines
"""


def _fresh_generation() -> bytes:
    # A generation created after a loss (eviction, restart) starts from the clock, far
    # above any counter an entry surviving from before could carry.
    return str(time.time_ns()).encode()


class RedisCache:
    """The cache in Redis, with a budget per call, no retries and a circuit breaker."""

    def __init__(self, url: str, *, timeout_s: float, breaker: Breaker, channel: str = "") -> None:
        self._channel = channel
        self.url = url
        self._timeout_s = timeout_s
        self._breaker = breaker
        self._url = url
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # redis-py retries failed calls by default; a cache call must not.
            retry=AsyncRetry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._sync: redis.Redis | None = None
        self._sync_lock = threading.Lock()

    @property
    def unavailable(self) -> bool:
        return self._breaker.is_open

    async def read(self, generation_key: str, entry_key: str) -> tuple[bytes | None, bytes | None]:
        async def both() -> tuple[bytes | None, bytes | None]:
            found = await self._client.mget(generation_key, entry_key)
            # Anything but two values, each bytes or nil, is a broken answer: a failure
            # of the cache like any other (a miss, counted by the breaker).
            match found:
                case [bytes() | None as generation, bytes() | None as entry]:
                    return generation, entry
            raise redis.exceptions.InvalidResponse(f"unexpected MGET answer: {found!r:.80}")

        return await self._call(both)

    async def start_generation(self, generation_key: str) -> bytes:
        async def create() -> bytes | None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(generation_key, _fresh_generation(), nx=True)
                pipe.get(generation_key)
                _, generation = await pipe.execute()
            return generation  # type: ignore[no-any-return]

        generation = await self._call(create)
        return generation if isinstance(generation, bytes) else _fresh_generation()

    async def write(self, entry_key: str, value: bytes, ttl_s: float) -> None:
        await self._call(lambda: self._client.set(entry_key, value, px=round(ttl_s * 1000)))

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One Redis call within the budget; any failure is CacheUnavailableError."""
        if not self._breaker.allow():
            raise CacheUnavailableError("the cache is unavailable (circuit open)")
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await make()
        except asyncio.CancelledError:
            # The caller went away: no verdict on Redis, but a trial call must not stay
            # pending forever (the breaker would never close).
            self._breaker.abandoned()
            raise
        except _CACHE_ERRORS as e:
            self._breaker.failed()
            if isinstance(e, TimeoutError | redis.TimeoutError):
                metrics.TIMEOUTS.labels(operation="cache").inc()
            raise CacheUnavailableError(f"the cache did not answer: {e!r}") from e
        self._breaker.succeeded()
        return result

    def bump(self, generation_keys: Collection[str]) -> None:
        if not generation_keys:
            return
        if not self._breaker.allow():
            raise CacheUnavailableError("the cache is unavailable (circuit open)")
        keys = sorted(generation_keys)
        try:
            # One script: the increments and their announcement, in one round trip, the
            # announcement after the values it carries exist.
            self._sync_client().eval(
                _BUMP_SCRIPT, len(keys), *keys, self._channel, _fresh_generation()
            )
        except _CACHE_ERRORS as e:
            self._breaker.failed()
            raise CacheUnavailableError(f"the cache did not take an invalidation: {e}") from e
        self._breaker.succeeded()

    def _sync_client(self) -> redis.Redis:
        with self._sync_lock:
            if self._sync is None:
                self._sync = redis.Redis.from_url(
                    self._url,
                    socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s,
                    retry=Retry(NoBackoff(), 0),
                    health_check_interval=0,
                )
            return self._sync

    async def aclose(self) -> None:
        await self._client.aclose()
        with self._sync_lock:
            if self._sync is not None:
                self._sync.close()
                self._sync = None


class LocalCache:
    """The cache inside one process (the embedded default): the same entries and
    generations in memory, least recently used entries dropped beyond ``max_entries``.
    Only correct when the projections that bump it run in the same process."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._generations: dict[str, int] = {}

    @property
    def unavailable(self) -> bool:
        return False

    async def read(self, generation_key: str, entry_key: str) -> tuple[bytes | None, bytes | None]:
        with self._lock:
            generation = self._generations.get(generation_key)
            found = self._entries.get(entry_key)
            if found is not None:
                if found[0] <= self._clock():
                    del self._entries[entry_key]
                    found = None
                else:
                    self._entries.move_to_end(entry_key)
        return (
            None if generation is None else str(generation).encode(),
            None if found is None else found[1],
        )

    async def start_generation(self, generation_key: str) -> bytes:
        with self._lock:
            return str(self._generations.setdefault(generation_key, 0)).encode()

    async def write(self, entry_key: str, value: bytes, ttl_s: float) -> None:
        with self._lock:
            self._entries[entry_key] = (self._clock() + ttl_s, value)
            self._entries.move_to_end(entry_key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    async def ping(self) -> None:
        return None

    def bump(self, generation_keys: Collection[str]) -> None:
        with self._lock:
            for key in generation_keys:
                self._generations[key] = self._generations.get(key, 0) + 1

    async def aclose(self) -> None:
        with self._lock:
            self._entries.clear()


def open_cache(settings: Settings, *, in_process: bool) -> RedisCache | LocalCache | None:
    """The deployment's cache: Redis when REDIS_URL is set, else the in-process one when
    the projections run in this process (``in_process``), else none (an API process
    cannot see another process's invalidations without Redis)."""
    if not settings.cache_enabled:
        return None
    if settings.redis_url:
        breaker = Breaker(settings.redis_breaker_failures, settings.redis_breaker_open_s)
        return RedisCache(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            breaker=breaker,
            channel=bump_channel(settings.cache_prefix),
        )
    if in_process:
        return LocalCache(settings.cache_local_entries)
    return None


class GenerationFeed:
    """This process's copy of the generations, fed by the bump channel. Trusted only while
    *fresh*: subscribed, and something (a bump, or the answer to a ping sent every
    max_lag_s / 4 when idle) heard within ``max_lag_s``. So a bump reaches this process's
    readers within max_lag_s even if the connection dies silently; a connection that
    closes is noticed at once. Every loss of the subscription forgets every generation
    and starts a new epoch: a value read from Redis during an older epoch is never
    learned, so nothing missed while unsubscribed is ever served. Lives on the event loop
    (not thread-safe)."""

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        max_lag_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._channel = channel
        self._max_lag_s = max_lag_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._generations: dict[str, int] = {}
        self._epoch = 0
        self._subscribed = False
        self._heard_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="generation feed")

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: redis-py may take a cancellation for the end of its own read
            # timeout and go on; the loop then sees _closing at its next turn.
            await asyncio.wait({task}, timeout=self._timeout_s + self._max_lag_s)

    def epoch(self) -> int | None:
        """The current epoch while fresh, else None (the memory tier is bypassed)."""
        if self._subscribed and self._clock() - self._heard_at <= self._max_lag_s:
            return self._epoch
        return None

    def generation(self, key: str) -> int | None:
        """The generation under ``key`` as last announced or learned, while fresh."""
        if self.epoch() is None:
            return None
        return self._generations.get(key)

    def learned(self, key: str, value: bytes, epoch: int) -> None:
        """A generation read from Redis by a lookup that started in ``epoch``. Values only
        grow (INCR; a recreated key starts from the clock): an older answer arriving
        after an announcement never moves the copy back."""
        if epoch != self._epoch or not self._subscribed:
            return
        try:
            number = int(value)
        except ValueError:
            return
        if number > self._generations.get(key, -1):
            self._generations[key] = number

    def _announced(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            key, _, value = line.partition(b" ")
            try:
                number = int(value)
            except ValueError:
                continue
            name = key.decode()
            if number > self._generations.get(name, -1):
                self._generations[name] = number

    def _lost(self) -> None:
        self._subscribed = False
        self._epoch += 1
        self._generations.clear()

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._listen()
            except _CACHE_ERRORS as e:
                logger.warning("cache bump channel lost: %r; memory tier bypassed", e)
            finally:
                self._lost()
            await asyncio.sleep(self._max_lag_s)

    async def _listen(self) -> None:
        client = redis.asyncio.Redis.from_url(
            self._url,
            socket_connect_timeout=self._timeout_s,
            retry=AsyncRetry(NoBackoff(), 0),
            health_check_interval=0,
        )
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(self._timeout_s):
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=self._timeout_s)
                    if message is not None and message["type"] == "subscribe":
                        break
            self._epoch += 1
            self._generations.clear()
            self._subscribed = True
            self._heard_at = self._clock()
            ping_every_s = self._max_lag_s / 4
            while not self._closing:
                message = await pubsub.get_message(timeout=ping_every_s)
                if message is None:
                    if self._clock() - self._heard_at > 2 * self._max_lag_s:
                        raise TimeoutError("the bump channel went silent")
                    await pubsub.ping()
                    continue
                self._heard_at = self._clock()
                if message["type"] == "message":
                    self._announced(message["data"])
        finally:
            self._subscribed = False
            with contextlib.suppress(*_CACHE_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
                await client.aclose()
