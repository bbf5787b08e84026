"""The forecast queue read model: the forecasts that are queued or running, one row each,
so admission control counts at most the queue's limit of rows (globally and per tenant)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from domain.forecast import QUEUED, RUNNING, Forecast
from projections.readmodel import Positioned, Tx


class QueueProjector:
    name: ClassVar[str] = "queue"

    def ddl(self) -> list[str]:
        return [
            "CREATE TABLE IF NOT EXISTS queue_active ("
            " id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, status TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS queue_active_tenant ON queue_active (tenant_id)",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        # Applied in log order; finished forecasts leave the table.
        for event, _ in events:
            if isinstance(event, Forecast.Requested):
                tx.execute(
                    "INSERT INTO queue_active (id, tenant_id, status) VALUES (?, ?, ?)"
                    " ON CONFLICT (id) DO NOTHING",
                    [str(event.originator_id), str(event.tenant_id), QUEUED],
                )
            elif isinstance(event, Forecast.Started):
                tx.execute(
                    "UPDATE queue_active SET status = ? WHERE id = ?",
                    [RUNNING, str(event.originator_id)],
                )
            elif isinstance(event, Forecast.Completed | Forecast.Failed):
                tx.execute("DELETE FROM queue_active WHERE id = ?", [str(event.originator_id)])
