"""Cache-aside for every read: an answer is looked up under the tenant's current
generation of the read model it comes from, else read from the database and stored.

- Freshness: an entry is valid only under the generation it was read under; the
  projection workers bump a tenant's generation after each batch they commit, so the
  next read after a change misses. A read that sends X-Consistency-Token is served from
  the cache only if the entry's position has reached the token (else it waits for the
  read model and reads the database).
- Memory tier: with Redis, each process also keeps the entries it has seen (up to a
  byte budget, least recently used dropped, within their TTL) and serves one without a
  round trip when its generation equals the process's copy of the tenant's generation
  (infra.cache.GenerationFeed, fed by the bumps' channel). While that copy is not fresh
  (unsubscribed, or silent for longer than its bound) every read goes to Redis, as
  without the tier; X-Consistency-Token is honoured the same way in both tiers.
- Stampedes: concurrent reads of one key in a process share one lookup and one query
  (single-flight), so a cold hot key costs one database query per process.
- Failures: anything unreadable under a key is a miss (and is overwritten); a cache that
  fails or is slow costs at most its budget, then the read is served from the database
  and the answer is marked degraded.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from uuid import UUID

import msgspec

from infra import metrics
from infra.cache import (
    CacheStore,
    CacheUnavailableError,
    GenerationFeed,
    entry_key,
    generation_key,
)


class Entry(msgspec.Struct, frozen=True, array_like=True):
    generation: bytes
    position: int
    body: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)
# Bound once: labels() takes a lock and builds a key on every call.
_HIT = metrics.CACHE.labels(result="hit")
_MEMORY_HIT = metrics.CACHE.labels(result="memory")
_MISS = metrics.CACHE.labels(result="miss")
_ERROR = metrics.CACHE.labels(result="error")
# What an entry costs the memory tier besides its body (key, tuples, the Struct).
_OVERHEAD_BYTES = 300


class _Remembered(NamedTuple):
    generation: int
    expires_at: float
    entry: Entry
    size: int


class MemoryTier:
    """Entries this process has seen, least recently used dropped beyond ``max_bytes``;
    each expires with its TTL as in Redis. On the event loop only (no lock)."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Remembered] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> _Remembered | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found.expires_at <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found

    def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        try:
            generation = int(entry.generation)
        except ValueError:
            return
        size = len(entry.body) + len(key) + _OVERHEAD_BYTES
        if size > self._max_bytes:
            return
        self._drop(key)
        self._entries[key] = _Remembered(generation, self._clock() + ttl_s, entry, size)
        self.bytes += size
        while self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= found.size


@dataclass(frozen=True)
class Answer:
    body: bytes
    position: int
    # The cache failed during this read (it was served from the database).
    degraded: bool = False


Load = Callable[[], Awaitable[tuple[bytes, int]]]


def key_name(route: str, *parts: str) -> str:
    """An entry's name within a tenant's read model: the route and its (validated)
    parameters, hashed when long so keys stay short."""
    joined = "\x1f".join(parts)
    if len(joined) > 64:
        joined = hashlib.blake2b(joined.encode(), digest_size=16).hexdigest()
    return f"{route}:{joined}"


class ReadCache:
    def __init__(
        self,
        store: CacheStore | None,
        *,
        prefix: str,
        ttls: Mapping[str, float],
        feed: GenerationFeed | None = None,
        memory_bytes: int = 0,
    ) -> None:
        self.store = store
        self._prefix = prefix
        self._ttls = dict(ttls)
        self._flights: dict[str, asyncio.Future[Answer]] = {}
        # The memory tier, when there is a feed to trust it by.
        self.feed = feed if memory_bytes > 0 else None
        self.memory = MemoryTier(memory_bytes)

    @property
    def unavailable(self) -> bool:
        return self.store is not None and self.store.unavailable

    async def through(
        self,
        *,
        tenant_id: UUID,
        projection: str,
        name: str,
        token: int | None,
        load: Load,
    ) -> Answer:
        """The answer for ``name``, from the cache when valid, else from ``load``."""
        if self.store is None or projection not in self._ttls:
            body, position = await load()
            return Answer(body, position)
        key = entry_key(self._prefix, tenant_id, projection, name)
        feed = self.feed
        if feed is not None:
            current = feed.generation(generation_key(self._prefix, tenant_id, projection))
            if current is not None:
                found = self.memory.get(key)
                if (
                    found is not None
                    and found.generation == current
                    and (not token or found.entry.position >= token)
                ):
                    _MEMORY_HIT.inc()
                    return Answer(found.entry.body, found.entry.position)
        if token:
            # Its own lookup: a shared flight may have started before the token's write.
            return await self._lookup_or_load(self.store, tenant_id, projection, key, token, load)
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(
                self._lookup_or_load(self.store, tenant_id, projection, key, None, load)
            )
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # Shielded: one reader going away does not cancel the others' answer.
        return await asyncio.shield(flight)

    def _landed(self, key: str, flight: asyncio.Future[Answer]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved, even if every reader went away

    async def _lookup_or_load(
        self,
        store: CacheStore,
        tenant_id: UUID,
        projection: str,
        key: str,
        token: int | None,
        load: Load,
    ) -> Answer:
        generation: bytes | None = None
        degraded = False
        gen_key = generation_key(self._prefix, tenant_id, projection)
        # Taken before asking Redis: what Redis says is learned only if the feed has not
        # been lost (and so possibly missed a bump) since.
        epoch = self.feed.epoch() if self.feed is not None else None
        ttl_s = self._ttls[projection]
        try:
            generation, raw = await store.read(gen_key, key)
            if generation is not None and epoch is not None and self.feed is not None:
                self.feed.learned(gen_key, generation, epoch)
            entry = _decoded(raw)
            if (
                entry is not None
                and generation is not None
                and entry.generation == generation
                and (token is None or entry.position >= token)
            ):
                _HIT.inc()
                if epoch is not None:
                    self.memory.put(key, entry, ttl_s)
                return Answer(entry.body, entry.position)
            _MISS.inc()
            if generation is None:
                generation = await store.start_generation(gen_key)
        except CacheUnavailableError:
            _ERROR.inc()
            generation, degraded = None, True
        body, position = await load()
        if generation is not None:
            fresh = Entry(generation, position, body)
            try:
                await store.write(key, _encoder.encode(fresh), ttl_s)
            except CacheUnavailableError:
                _ERROR.inc()
                degraded = True
            else:
                if epoch is not None:
                    self.memory.put(key, fresh, ttl_s)
        return Answer(body, position, degraded)

    async def aclose(self) -> None:
        if self.feed is not None:
            await self.feed.aclose()
        if self.store is not None:
            await self.store.aclose()


def _decoded(raw: bytes | None) -> Entry | None:
    """The entry under a key; anything unreadable there is a miss."""
    if raw is None:
        return None
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
