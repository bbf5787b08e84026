"""How the parts are put together for each kind of process: which projections run, the
job broker and its workers, and admission control of forecasts."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from uuid import UUID

import dramatiq

from commands.context import QueueLimits
from commands.forecast_jobs import JobDeps, declare_actor
from infra import broker as jobs
from infra import killable
from infra.cache import Invalidator, LocalCache, RedisCache, open_cache
from infra.clock import utc_now
from infra.eventstore import EventLog
from infra.readstore import ReadStore
from infra.settings import Settings
from projections.audit import AuditProjector
from projections.dashboard import DashboardProjector
from projections.dispatch import DispatchProjector
from projections.forecasts import ForecastsProjector
from projections.queue import QueueProjector
from projections.readmodel import Projector, open_read_model
from projections.runner import ProjectionRunner
from projections.scenarios import ScenariosProjector
from projections.usage import UsageProjector

logger = logging.getLogger("accubooks.wiring")


def projectors(broker: dramatiq.Broker | None = None) -> list[Projector]:
    """The read models, plus the dispatcher when jobs have somewhere to go."""
    found: list[Projector] = [
        ScenariosProjector(),
        ForecastsProjector(),
        DashboardProjector(),
        UsageProjector(),
        QueueProjector(),
        AuditProjector(),
    ]
    if broker is not None:
        found.append(DispatchProjector(functools.partial(jobs.send_generate_forecast, broker)))
    return found


def projection_runner(
    settings: Settings,
    log: EventLog,
    broker: dramatiq.Broker | None = None,
    cache: RedisCache | LocalCache | None = None,
) -> ProjectionRunner:
    """The read models' workers. They invalidate ``cache``, or with none given the
    deployment's Redis cache if REDIS_URL is set (a separate projection process)."""
    cache = cache or open_cache(settings, in_process=False)
    return ProjectionRunner(
        settings,
        log,
        projectors(broker),
        batch_size=settings.projection_batch_size,
        wakeup_s=(
            settings.projection_wakeup_s if settings.database_url else settings.projection_poll_s
        ),
        invalidator=Invalidator(cache, settings.cache_prefix) if cache else None,
    )


def cache_ttls(settings: Settings) -> dict[str, float]:
    """How long a cached answer of each read model may be served (invalidation aside)."""
    return {
        "dashboard": settings.cache_ttl_dashboard_s,
        "forecasts": settings.cache_ttl_forecasts_s,
        "usage": settings.cache_ttl_usage_s,
        "scenarios": settings.cache_ttl_scenarios_s,
    }


def ensure_read_models(settings: Settings) -> None:
    """Creates every read model's tables if missing, so an API process answers (empty)
    reads and counts the queue before any projection worker has run."""
    for projector in projectors():
        open_read_model(settings, projector).datastore.close()


def queue_limits(settings: Settings, store: ReadStore) -> QueueLimits:
    def depth(tenant_id: UUID) -> tuple[int, int]:
        [row] = store.query(
            "queue",
            "SELECT (SELECT COUNT(*) FROM queue_active) AS total,"
            " (SELECT COUNT(*) FROM queue_active WHERE tenant_id = ?) AS tenant",
            [str(tenant_id)],
        )
        return int(row["total"]), int(row["tenant"])

    return QueueLimits(
        depth=depth, total=settings.forecast_queue_limit, per_tenant=settings.forecast_tenant_limit
    )


@dataclass
class JobWorkers:
    """A broker with the forecast actor declared and a Dramatiq worker consuming it."""

    broker: dramatiq.Broker
    worker: dramatiq.Worker
    threads: int

    def start(self) -> None:
        killable.warm_up(self.threads)
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop(timeout=10_000)
        self.broker.close()


def job_workers(settings: Settings, log: EventLog, broker: dramatiq.Broker) -> JobWorkers:
    deps = JobDeps(log=log, clock=utc_now, timeout_s=settings.forecast_timeout_s)
    declare_actor(broker, deps)
    # An idle Redis consumer backs off up to worker_timeout between polls (1 s by
    # default), which would add up to that to every forecast's latency.
    worker = dramatiq.Worker(
        broker,
        worker_threads=settings.worker_threads,
        worker_timeout=round(settings.worker_idle_poll_s * 1000),
    )
    return JobWorkers(broker=broker, worker=worker, threads=settings.worker_threads)
