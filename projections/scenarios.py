"""The scenarios read model: one row per scenario with its forecast count and its latest
10 forecast summaries, plus a per-tenant total, so a list page or a detail is one
indexed statement (keyset index on tenant, created_at, id)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from domain.forecast import COMPLETED, FAILED, QUEUED, RUNNING, Forecast
from domain.scenario import Scenario
from projections.readmodel import Positioned, Tx, id_text, iso

LATEST_FORECASTS = 10

_COLUMNS = (
    "tenant_id, id, created_at, updated_at, name, type, status, version, baseline, "
    "assumptions, forecast_count, latest_forecasts"
)
_TYPED_COLUMNS = list(
    zip(
        (c.strip() for c in _COLUMNS.split(",")),
        ("text",) * 7 + ("bigint", "text", "text", "bigint", "text"),
        strict=True,
    )
)


class ScenariosProjector:
    name: ClassVar[str] = "scenarios"

    def ddl(self) -> list[str]:
        return [
            "CREATE TABLE IF NOT EXISTS scenarios_rows ("
            " tenant_id TEXT NOT NULL, id TEXT NOT NULL, created_at TEXT NOT NULL,"
            " updated_at TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,"
            " status TEXT NOT NULL, version INTEGER NOT NULL, baseline TEXT NOT NULL,"
            " assumptions TEXT NOT NULL, forecast_count INTEGER NOT NULL,"
            " latest_forecasts TEXT NOT NULL, PRIMARY KEY (tenant_id, id))",
            "CREATE INDEX IF NOT EXISTS scenarios_rows_page"
            " ON scenarios_rows (tenant_id, created_at DESC, id DESC)",
            "CREATE INDEX IF NOT EXISTS scenarios_rows_id ON scenarios_rows (id)",
            "CREATE TABLE IF NOT EXISTS scenarios_tenants ("
            " tenant_id TEXT PRIMARY KEY, total BIGINT NOT NULL)",
            # Which scenario a forecast belongs to, for forecast events that only name
            # the forecast (their status changes update the scenario's summaries).
            "CREATE TABLE IF NOT EXISTS scenarios_forecast_owner ("
            " forecast_id TEXT PRIMARY KEY, scenario_id TEXT NOT NULL)",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        status_changes = [e for e, _ in events if isinstance(e, _STATUS_EVENTS)]
        owner_of: dict[str, str] = {
            row["forecast_id"]: row["scenario_id"]
            for row in tx.select_in(
                "SELECT forecast_id, scenario_id FROM scenarios_forecast_owner WHERE forecast_id",
                sorted({id_text(e.originator_id) for e in status_changes}),
            )
        }
        owner_of.update(
            (id_text(e.originator_id), id_text(e.scenario_id))
            for e, _ in events
            if isinstance(e, Forecast.Requested)
        )
        ids = {id_text(e.originator_id) for e, _ in events if isinstance(e, Scenario.Event)}
        ids |= {id_text(e.scenario_id) for e, _ in events if isinstance(e, Forecast.Requested)}
        ids |= {
            owner_of[id_text(e.originator_id)]
            for e in status_changes
            if id_text(e.originator_id) in owner_of
        }
        rows: dict[str, dict[str, Any]] = {
            row["id"]: dict(row)
            for row in tx.select_in(f"SELECT {_COLUMNS} FROM scenarios_rows WHERE id", sorted(ids))
        }
        new_per_tenant: dict[str, int] = {}
        owners: list[tuple[str, str]] = []
        for event, _ in events:
            if isinstance(event, Scenario.Created):
                row = _new_row(event)
                rows[row["id"]] = row
                new_per_tenant[row["tenant_id"]] = new_per_tenant.get(row["tenant_id"], 0) + 1
            elif isinstance(event, Scenario.Event):
                _change(rows[id_text(event.originator_id)], event)
            elif isinstance(event, Forecast.Requested):
                scenario = rows.get(id_text(event.scenario_id))
                if scenario is not None:
                    _add_forecast(scenario, event)
                    owners.append((id_text(event.originator_id), id_text(event.scenario_id)))
            elif isinstance(event, _STATUS_EVENTS):
                owner = rows.get(owner_of.get(id_text(event.originator_id), ""))
                if owner is not None:
                    _update_summary(owner, event)
        tx.insert_rows(
            "scenarios_rows",
            _TYPED_COLUMNS,
            [[row[c] for c, _ in _TYPED_COLUMNS] for row in rows.values()],
            "ON CONFLICT (tenant_id, id) DO UPDATE SET updated_at = excluded.updated_at,"
            " name = excluded.name, status = excluded.status, version = excluded.version,"
            " baseline = excluded.baseline, assumptions = excluded.assumptions,"
            " forecast_count = excluded.forecast_count,"
            " latest_forecasts = excluded.latest_forecasts",
        )
        tx.insert_rows(
            "scenarios_tenants",
            [("tenant_id", "text"), ("total", "bigint")],
            sorted(new_per_tenant.items()),
            "ON CONFLICT (tenant_id) DO UPDATE"
            " SET total = scenarios_tenants.total + excluded.total",
        )
        tx.insert_rows(
            "scenarios_forecast_owner",
            [("forecast_id", "text"), ("scenario_id", "text")],
            owners,
            "ON CONFLICT (forecast_id) DO NOTHING",
        )


_STATUS_EVENTS = (Forecast.Started, Forecast.Completed, Forecast.Failed)


def _new_row(event: Scenario.Created) -> dict[str, Any]:
    assumptions = dict(event.assumptions)
    scenario_type = assumptions.pop("type")
    at = iso(event.timestamp)
    return {
        "tenant_id": id_text(event.tenant_id),
        "id": id_text(event.originator_id),
        "created_at": at,
        "updated_at": at,
        "name": event.name,
        "type": scenario_type,
        "status": "active",
        "version": event.originator_version,
        "baseline": _json(event.baseline),
        "assumptions": _json(assumptions),
        "forecast_count": 0,
        "latest_forecasts": "[]",
    }


def _change(row: dict[str, Any], event: Scenario.Event) -> None:
    if isinstance(event, Scenario.Renamed):
        row["name"] = event.name
    elif isinstance(event, Scenario.BaselineChanged):
        row["baseline"] = _json(event.baseline)
    elif isinstance(event, Scenario.AssumptionsChanged):
        assumptions = dict(event.assumptions)
        assumptions.pop("type")
        row["assumptions"] = _json(assumptions)
    elif isinstance(event, Scenario.Archived):
        row["status"] = "archived"
    row["version"] = event.originator_version
    row["updated_at"] = iso(event.timestamp)


def _add_forecast(row: dict[str, Any], event: Forecast.Requested) -> None:
    summary: Mapping[str, Any] = {
        "id": id_text(event.originator_id),
        "status": QUEUED,
        "horizonMonths": event.horizon_months,
        "paths": event.paths,
        "requestedAt": iso(event.timestamp),
        "completedAt": None,
    }
    latest = [summary, *json.loads(row["latest_forecasts"])][:LATEST_FORECASTS]
    row["latest_forecasts"] = _json(latest)
    row["forecast_count"] += 1


def _update_summary(row: dict[str, Any], event: Any) -> None:
    """A forecast among the latest 10 shows its new status; older ones are not listed."""
    latest = json.loads(row["latest_forecasts"])
    for summary in latest:
        if summary["id"] == id_text(event.originator_id):
            if isinstance(event, Forecast.Started):
                summary["status"] = RUNNING
            else:
                summary["status"] = COMPLETED if isinstance(event, Forecast.Completed) else FAILED
                summary["completedAt"] = iso(event.timestamp)
            row["latest_forecasts"] = _json(latest)
            return


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
