"""The forecast queue read model: the forecasts that are queued or running, one row each,
so admission control counts at most the queue's limit of rows (globally and per tenant)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from domain.forecast import QUEUED, RUNNING, Forecast
from projections.readmodel import Positioned, Tx, id_text


class QueueProjector:
    name: ClassVar[str] = "queue"

    def ddl(self) -> list[str]:
        return [
            "CREATE TABLE IF NOT EXISTS queue_active ("
            " id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, status TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS queue_active_tenant ON queue_active (tenant_id)",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        # The batch is folded to one change per forecast (events come in log order:
        # requested, started, then finished), then each kind is written in one statement.
        inserted: dict[str, list[str]] = {}  # id -> [tenant_id, status]
        started: set[str] = set()
        finished: set[str] = set()
        for event, _ in events:
            if isinstance(event, Forecast.Requested):
                inserted.setdefault(
                    id_text(event.originator_id), [id_text(event.tenant_id), QUEUED]
                )
            elif isinstance(event, Forecast.Started):
                forecast_id = id_text(event.originator_id)
                if forecast_id in inserted:
                    inserted[forecast_id][1] = RUNNING
                else:
                    started.add(forecast_id)
            elif isinstance(event, Forecast.Completed | Forecast.Failed):
                # Finished forecasts leave the table, whatever came before in the batch.
                forecast_id = id_text(event.originator_id)
                inserted.pop(forecast_id, None)
                started.discard(forecast_id)
                finished.add(forecast_id)
        tx.delete_in("queue_active", "id", sorted(finished))
        tx.update_rows(
            "queue_active",
            [("status", "text")],
            [("id", "text")],
            [(RUNNING, forecast_id) for forecast_id in sorted(started)],
        )
        tx.insert_rows(
            "queue_active",
            [("id", "text"), ("tenant_id", "text"), ("status", "text")],
            [(forecast_id, *row) for forecast_id, row in inserted.items()],
            "ON CONFLICT (id) DO NOTHING",
        )
