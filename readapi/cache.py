"""Cache-aside for every read: an answer is looked up under the tenant's current
generation of the read model it comes from, else read from the database and stored.

- Freshness: an entry is valid only under the generation it was read under; the
  projection workers bump a tenant's generation after each batch they commit, so the
  next read after a change misses. A read that sends X-Consistency-Token is served from
  the cache only if the entry's position has reached the token (else it waits for the
  read model and reads the database).
- Stampedes: concurrent reads of one key in a process share one lookup and one query
  (single-flight), so a cold hot key costs one database query per process.
- Failures: anything unreadable under a key is a miss (and is overwritten); a cache that
  fails or is slow costs at most its budget, then the read is served from the database
  and the answer is marked degraded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from uuid import UUID

import msgspec

from infra import metrics
from infra.cache import CacheStore, CacheUnavailableError, entry_key, generation_key


class Entry(msgspec.Struct, frozen=True, array_like=True):
    generation: bytes
    position: int
    body: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


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
    def __init__(self, store: CacheStore | None, *, prefix: str, ttls: Mapping[str, float]) -> None:
        self.store = store
        self._prefix = prefix
        self._ttls = dict(ttls)
        self._flights: dict[str, asyncio.Future[Answer]] = {}

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
        try:
            generation, raw = await store.read(
                generation_key(self._prefix, tenant_id, projection), key
            )
            entry = _decoded(raw)
            if (
                entry is not None
                and generation is not None
                and entry.generation == generation
                and (token is None or entry.position >= token)
            ):
                metrics.CACHE.labels(result="hit").inc()
                return Answer(entry.body, entry.position)
            metrics.CACHE.labels(result="miss").inc()
            if generation is None:
                generation = await store.start_generation(
                    generation_key(self._prefix, tenant_id, projection)
                )
        except CacheUnavailableError:
            metrics.CACHE.labels(result="error").inc()
            generation, degraded = None, True
        body, position = await load()
        if generation is not None:
            value = _encoder.encode(Entry(generation, position, body))
            try:
                await store.write(key, value, self._ttls[projection])
            except CacheUnavailableError:
                metrics.CACHE.labels(result="error").inc()
                degraded = True
        return Answer(body, position, degraded)

    async def aclose(self) -> None:
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
