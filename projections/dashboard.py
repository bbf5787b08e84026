"""The dashboard read model: one row per tenant with its scenario counts (by status and
type), forecast counts by status and the time of its latest activity."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from domain.forecast import COMPLETED, FAILED, QUEUED, RUNNING, Forecast
from domain.scenario import Scenario
from projections.readmodel import Positioned, Tx, id_text, iso

_COUNTERS = (
    "scenarios_total",
    "scenarios_active",
    "scenarios_archived",
    "forecasts_total",
    "forecasts_queued",
    "forecasts_running",
    "forecasts_completed",
    "forecasts_failed",
)
_COLUMNS = ("tenant_id", *_COUNTERS, "by_type", "last_activity_at")
_TYPED_COLUMNS = [
    ("tenant_id", "text"),
    *((c, "bigint") for c in _COUNTERS),
    ("by_type", "text"),
    ("last_activity_at", "text"),
]


class DashboardProjector:
    name: ClassVar[str] = "dashboard"

    def ddl(self) -> list[str]:
        counters = ", ".join(f"{c} BIGINT NOT NULL" for c in _COUNTERS)
        return [
            "CREATE TABLE IF NOT EXISTS dashboard_tenants ("
            f" tenant_id TEXT PRIMARY KEY, {counters}, by_type TEXT NOT NULL,"
            " last_activity_at TEXT)",
            # Each forecast's status, so a status change moves one count to another.
            "CREATE TABLE IF NOT EXISTS dashboard_forecasts ("
            " id TEXT PRIMARY KEY, status TEXT NOT NULL)",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        tenants = sorted(
            {
                id_text(e.tenant_id)
                for e, _ in events
                if isinstance(e, Scenario.Event | Forecast.Event)
            }
        )
        rows: dict[str, dict[str, Any]] = {
            row["tenant_id"]: {**row, "by_type": json.loads(row["by_type"])}
            for row in tx.select_in(
                f"SELECT {', '.join(_COLUMNS)} FROM dashboard_tenants WHERE tenant_id", tenants
            )
        }
        statuses: dict[str, str] = {
            row["id"]: row["status"]
            for row in tx.select_in(
                "SELECT id, status FROM dashboard_forecasts WHERE id",
                sorted(
                    {id_text(e.originator_id) for e, _ in events if isinstance(e, _STATUS_EVENTS)}
                ),
            )
        }
        for event, _ in events:
            if not isinstance(event, Scenario.Event | Forecast.Event):
                continue
            tenant_id = id_text(event.tenant_id)
            row = rows.get(tenant_id) or rows.setdefault(tenant_id, _empty(tenant_id))
            row["last_activity_at"] = iso(event.timestamp)
            if isinstance(event, Scenario.Created):
                row["scenarios_total"] += 1
                row["scenarios_active"] += 1
                scenario_type = event.assumptions["type"]
                row["by_type"][scenario_type] = row["by_type"].get(scenario_type, 0) + 1
            elif isinstance(event, Scenario.Archived):
                row["scenarios_active"] -= 1
                row["scenarios_archived"] += 1
            elif isinstance(event, Forecast.Requested):
                row["forecasts_total"] += 1
                row["forecasts_queued"] += 1
                statuses[id_text(event.originator_id)] = QUEUED
            elif isinstance(event, _STATUS_EVENTS):
                forecast_id = id_text(event.originator_id)
                new_status = _STATUS_OF[type(event)]
                row[f"forecasts_{statuses[forecast_id]}"] -= 1
                row[f"forecasts_{new_status}"] += 1
                statuses[forecast_id] = new_status
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
        tx.insert_rows(
            "dashboard_tenants",
            _TYPED_COLUMNS,
            [
                [json.dumps(row[c], sort_keys=True) if c == "by_type" else row[c] for c in _COLUMNS]
                for row in rows.values()
            ],
            f"ON CONFLICT (tenant_id) DO UPDATE SET {updates}",
        )
        tx.insert_rows(
            "dashboard_forecasts",
            [("id", "text"), ("status", "text")],
            sorted(statuses.items()),
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status",
        )


_STATUS_OF: dict[type[Any], str] = {
    Forecast.Started: RUNNING,
    Forecast.Completed: COMPLETED,
    Forecast.Failed: FAILED,
}
_STATUS_EVENTS = tuple(_STATUS_OF)


def _empty(tenant_id: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        **dict.fromkeys(_COUNTERS, 0),
        "by_type": {},
        "last_activity_at": None,
    }
