"""Which projections exist, and the runner that keeps them: the one list every process
kind (embedded, `accubooks project`) builds from."""

from __future__ import annotations

from infra.eventstore import EventLog
from infra.settings import Settings
from projections.dashboard import DashboardProjector
from projections.forecasts import ForecastsProjector
from projections.readmodel import Projector
from projections.runner import ProjectionRunner
from projections.scenarios import ScenariosProjector
from projections.usage import UsageProjector


def projectors() -> list[Projector]:
    return [ScenariosProjector(), ForecastsProjector(), DashboardProjector(), UsageProjector()]


def projection_runner(settings: Settings, log: EventLog) -> ProjectionRunner:
    return ProjectionRunner(
        settings,
        log,
        projectors(),
        batch_size=settings.projection_batch_size,
        wakeup_s=(
            settings.projection_wakeup_s if settings.database_url else settings.projection_poll_s
        ),
    )
