"""The composition root of the HTTP service: opens the event store in the lifespan, wires
collaborators into the app state, mounts the routes and the error handlers."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commands import routes as write_routes
from commands.context import Collaborators
from infra.auth import Authenticator
from infra.broker import open_broker
from infra.cache import CacheStore, GenerationFeed, RedisCache, bump_channel, open_cache
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.readstore import ReadStore
from infra.settings import Settings, cursor_key
from infra.signing import load_signer
from projections.pointintime import replay_dashboard
from readapi import audit, dashboard, forecasts, pointintime, scenarios, usage
from readapi.cache import ReadCache
from readapi.context import AuditTools, ReadApi
from readapi.paging import CursorSigner
from service import errors, health, logs, metrics, openapi, shedding, wiring
from service.status import STATE_KEY as STATUS_STATE_KEY
from service.status import ServiceStatus, mark_degraded

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _RequestIds:
    """Ids shaped like a uuid4's hex (32 hex digits): 80 random bits drawn once per
    process (again in a forked worker), then a counter. Unique without a call to the
    system's random source per request (uuid4 was 4 % of a cached read's CPU); they
    correlate logs and events, they are not secrets."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(10)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


_request_ids = _RequestIds()


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-Id when it is sane, else a new id."""
    given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
    return given if _CLIENT_REQUEST_ID.match(given) else _request_ids.next()


class RequestMiddleware:
    """What every HTTP answer gets, in one wrapper of ``send`` (each wrapper costs a
    coroutine per message): a request id (the client's X-Request-Id when it is sane,
    recorded in the events it causes, its logs and errors, echoed on the response), the
    degraded-status headers (service.status), the duration histogram (service.metrics)
    and the access log line (service.logs), for shed requests too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        # An app that raises before answering is answered 500 by Starlette's outermost
        # middleware.
        status = 500

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0] != b"x-request-id"]
                headers.append(id_header)
                mark_degraded(headers, state)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            duration_s = time.perf_counter() - started
            route, method = metrics.route_template(scope), metrics.method_label(scope)
            metrics.observe(route, method, status, duration_s)
            logs.access(state, route, method, status, duration_s)


def _generation_feed(settings: Settings, cache: CacheStore | None) -> GenerationFeed | None:
    """The feed that lets reads be answered from memory: only with Redis (the in-process
    cache is memory already) and a memory budget."""
    if not isinstance(cache, RedisCache) or settings.cache_local_tier_bytes == 0:
        return None
    return GenerationFeed(
        cache.url,
        bump_channel(settings.cache_prefix),
        max_lag_s=settings.cache_local_max_lag_s,
        timeout_s=settings.redis_timeout_s,
    )


def _shedding_gate(settings: Settings, routes: list[BaseRoute]) -> shedding.Gate:
    def observe(scope: Scope, status: int, duration_s: float) -> None:
        route = metrics.route_template(scope, routes)
        metrics.observe(route, metrics.method_label(scope), status, duration_s)

    return shedding.Gate(
        settings.max_in_flight,
        request_id=request_id_of,
        observe=observe,
        latency_target_s=settings.shed_latency_target_ms / 1000,
    )


def _tenant_store(settings: Settings) -> ReadStore | None:
    """The store the read routes serve tenants from when READ_DATABASE_URL is set (else
    they share the process's store), refused if row-level security does not bind it."""
    if not settings.read_database_url:
        return None
    store = ReadStore.for_tenants(settings)
    try:
        store.check_scoped_role()
    except BaseException:
        store.close()
        raise
    return store


def create_app(
    settings: Settings,
    *,
    event_log: EventLog | None = None,
    run_projections: bool = False,
    run_jobs: bool = True,
) -> Starlette:
    """The ASGI app. ``event_log`` lets a caller share an already open store (tests, the
    embedded process); otherwise the lifespan opens and closes its own. With
    ``run_projections`` the projection workers, the forecast dispatcher and job workers
    run inside this process (the embedded default: the in-process broker unless
    BROKER_URL names one); ``run_jobs=False`` keeps only the read models (forecasts then
    stay queued, which tests of reads and admission rely on)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # First, before anything else starts: a reader role that row-level security does
        # not bind stops the process.
        tenant_store = _tenant_store(settings)
        log = event_log or open_event_log(settings)
        workers = runner = None
        # Redis when REDIS_URL is set; else in-process, if the projections run here.
        cache = open_cache(settings, in_process=run_projections)
        if run_projections:
            if run_jobs:
                workers = wiring.job_workers(settings, log, open_broker(settings))
                workers.start()
            runner = wiring.projection_runner(
                settings, log, workers.broker if workers else None, cache
            )
            runner.start()
        else:
            wiring.ensure_read_models(settings)
        # Readiness and admission count across tenants; the read routes serve one tenant,
        # as a role row-level security binds when READ_DATABASE_URL is set.
        store = ReadStore(settings)
        read_api = ReadApi(
            store=tenant_store or store,
            signer=CursorSigner(cursor_key(settings)),
            clock=utc_now,
            read_your_writes_timeout_s=settings.read_your_writes_timeout_s,
            cache=ReadCache(
                cache,
                prefix=settings.cache_prefix,
                ttls=wiring.cache_ttls(settings),
                feed=_generation_feed(settings, cache),
                memory_bytes=settings.cache_local_tier_bytes,
            ),
            audit=AuditTools(
                signer=load_signer(settings), mapper=log.mapper, replay_dashboard=replay_dashboard
            ),
            log_head=log.position,
        )
        if read_api.cache.feed is not None:
            read_api.cache.feed.start()
        # Also on app.state, for operators' tools and tests that wait on positions.
        app.state.projections = runner
        app.state.read_api = read_api
        status = ServiceStatus(read_api.cache)
        readiness = health.ReadinessProbe(
            settings, log, store, [p.name for p in wiring.projectors()], cache=read_api.cache
        )
        refresher = asyncio.create_task(
            status.refresh_forever(readiness.degraded_reasons, settings.status_refresh_s)
        )
        deps = Collaborators(
            log=log,
            clock=utc_now,
            new_id=uuid.uuid4,
            attempts=settings.command_attempts,
            queue=wiring.queue_limits(settings, store),
        )
        try:
            yield {
                "authenticator": Authenticator(
                    log, ttl_s=settings.auth_cache_ttl_s, max_entries=settings.auth_cache_entries
                ),
                "write_api": write_routes.WriteApi(
                    deps=deps, max_body_bytes=settings.max_body_bytes
                ),
                "read_api": read_api,
                "projections": runner,
                "readiness": readiness,
                STATUS_STATE_KEY: status,
            }
        finally:
            refresher.cancel()
            await readiness.settle()
            store.close()
            if tenant_store is not None:
                tenant_store.close()
            if runner is not None:
                runner.stop()
            if workers is not None:
                workers.stop()
            # After the workers: they invalidate through it until they stop.
            await read_api.cache.aclose()
            if event_log is None:
                log.close()

    app = Starlette(
        routes=[
            *health.routes,
            metrics.route,
            openapi.route,
            *write_routes.routes,
            *scenarios.routes,
            *forecasts.routes,
            *dashboard.routes,
            *usage.routes,
            *audit.routes,
            *pointintime.routes,
        ],
        exception_handlers=errors.handlers,
        lifespan=lifespan,
    )
    # Added last runs first: the request id, status headers, metrics and access log (so
    # shed requests are timed, logged and marked too), then shedding before everything
    # else. Our server's protocol sheds before all of it, through the same gate.
    gate = app.state.shed_gate = _shedding_gate(settings, app.routes)
    app.add_middleware(shedding.LoadSheddingMiddleware, gate=gate)
    app.add_middleware(RequestMiddleware)
    return app
