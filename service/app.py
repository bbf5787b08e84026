"""The composition root of the HTTP service: opens the event store in the lifespan, wires
collaborators into the app state, mounts the routes and the error handlers."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commands import routes as write_routes
from commands.context import Collaborators
from infra.auth import Authenticator
from infra.broker import open_broker
from infra.cache import open_cache
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
from service.status import DegradedHeadersMiddleware, ServiceStatus

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-Id when it is sane), recorded in
    the events it causes, its logs and its errors, and echoed on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode(
            "latin-1"
        )
        request_id = given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


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
        store = ReadStore(settings)
        read_api = ReadApi(
            store=store,
            signer=CursorSigner(cursor_key(settings)),
            clock=utc_now,
            read_your_writes_timeout_s=settings.read_your_writes_timeout_s,
            cache=ReadCache(cache, prefix=settings.cache_prefix, ttls=wiring.cache_ttls(settings)),
            audit=AuditTools(
                signer=load_signer(settings), mapper=log.mapper, replay_dashboard=replay_dashboard
            ),
            log_head=log.position,
        )
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
    # Added last runs first: the request id, then the access log and the request metrics
    # (so shed requests are timed and logged too), then shedding before everything else,
    # so a shed answer costs microseconds and still carries its request id.
    app.add_middleware(shedding.LoadSheddingMiddleware, max_in_flight=settings.max_in_flight)
    # Every answer, shed ones included, says whether the service is degraded.
    app.add_middleware(DegradedHeadersMiddleware)
    app.add_middleware(metrics.RequestMetricsMiddleware)
    app.add_middleware(logs.AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
