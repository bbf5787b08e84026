"""The usage read model: per tenant and calendar month (UTC), what it created, requested,
computed and appended, the figures a bill or a quota is made of."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from domain.events import Attributed
from domain.forecast import Forecast
from domain.receipt import CommandReceipt
from domain.scenario import Scenario
from projections.readmodel import Positioned, Tx, id_text, month_of

_COUNTERS = (
    "scenarios_created",
    "forecasts_requested",
    "forecasts_completed",
    "commands_accepted",
    "events_appended",
)


class UsageProjector:
    name: ClassVar[str] = "usage"

    def ddl(self) -> list[str]:
        counters = ", ".join(f"{c} BIGINT NOT NULL" for c in _COUNTERS)
        return [
            "CREATE TABLE IF NOT EXISTS usage_months ("
            f" tenant_id TEXT NOT NULL, month TEXT NOT NULL, {counters},"
            " compute_seconds DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant_id, month))",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        deltas: dict[tuple[str, str], dict[str, Any]] = {}
        for event, _ in events:
            if not isinstance(event, Attributed):
                continue
            key = (id_text(event.tenant_id), month_of(event.timestamp))  # type: ignore[attr-defined]
            delta = deltas.setdefault(key, {**dict.fromkeys(_COUNTERS, 0), "compute_seconds": 0.0})
            delta["events_appended"] += 1
            if isinstance(event, CommandReceipt.Recorded):
                delta["commands_accepted"] += 1
            elif isinstance(event, Scenario.Created):
                delta["scenarios_created"] += 1
            elif isinstance(event, Forecast.Requested):
                delta["forecasts_requested"] += 1
            elif isinstance(event, Forecast.Completed):
                delta["forecasts_completed"] += 1
                delta["compute_seconds"] += float(event.compute_seconds)
        columns = (*_COUNTERS, "compute_seconds")
        additions = ", ".join(f"{c} = usage_months.{c} + excluded.{c}" for c in columns)
        tx.insert_rows(
            "usage_months",
            [
                ("tenant_id", "text"),
                ("month", "text"),
                *((c, "bigint") for c in _COUNTERS),
                ("compute_seconds", "double precision"),
            ],
            [[*key, *(delta[c] for c in columns)] for key, delta in sorted(deltas.items())],
            f"ON CONFLICT (tenant_id, month) DO UPDATE SET {additions}",
        )
