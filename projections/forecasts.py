"""The forecasts read model: one row per forecast with its scenario's id, name and type
copied in, and per-tenant totals for every filter (scenario, status, both, none), so a
filtered page is one indexed statement with its total and no COUNT(*)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from domain.forecast import COMPLETED, FAILED, QUEUED, RUNNING, Forecast
from domain.scenario import Scenario
from projections.readmodel import Positioned, Tx, id_text, iso

ANY = ""  # the filter value meaning "any" in forecasts_counts

_COLUMNS = (
    "tenant_id, id, scenario_id, scenario_name, scenario_type, status, horizon_months,"
    " paths, created_at, completed_at, failure_reason, result"
)


class ForecastsProjector:
    name: ClassVar[str] = "forecasts"

    def ddl(self) -> list[str]:
        return [
            "CREATE TABLE IF NOT EXISTS forecasts_rows ("
            " tenant_id TEXT NOT NULL, id TEXT NOT NULL, scenario_id TEXT NOT NULL,"
            " scenario_name TEXT NOT NULL, scenario_type TEXT NOT NULL, status TEXT NOT NULL,"
            " horizon_months INTEGER NOT NULL, paths INTEGER NOT NULL,"
            " created_at TEXT NOT NULL, completed_at TEXT, failure_reason TEXT, result TEXT,"
            " PRIMARY KEY (tenant_id, id))",
            "CREATE INDEX IF NOT EXISTS forecasts_rows_page"
            " ON forecasts_rows (tenant_id, created_at DESC, id DESC)",
            "CREATE INDEX IF NOT EXISTS forecasts_rows_scenario"
            " ON forecasts_rows (tenant_id, scenario_id, created_at DESC, id DESC)",
            "CREATE INDEX IF NOT EXISTS forecasts_rows_status"
            " ON forecasts_rows (tenant_id, status, created_at DESC, id DESC)",
            "CREATE INDEX IF NOT EXISTS forecasts_rows_id ON forecasts_rows (id)",
            "CREATE TABLE IF NOT EXISTS forecasts_scenarios ("
            " id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, name TEXT NOT NULL,"
            " type TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS forecasts_counts ("
            " tenant_id TEXT NOT NULL, scenario_id TEXT NOT NULL, status TEXT NOT NULL,"
            " n BIGINT NOT NULL, PRIMARY KEY (tenant_id, scenario_id, status))",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        wanted = sorted(
            {id_text(e.scenario_id) for e, _ in events if isinstance(e, Forecast.Requested)}
        )
        scenarios: dict[str, dict[str, Any]] = {
            row["id"]: dict(row)
            for row in tx.select_in(
                "SELECT id, name, type FROM forecasts_scenarios WHERE id", wanted
            )
        }
        changed_ids = sorted(
            {id_text(e.originator_id) for e, _ in events if isinstance(e, _STATUS_EVENTS)}
        )
        # Rows stored before this batch whose status changes in it; rows the batch creates.
        stored: dict[str, dict[str, Any]] = {
            row["id"]: dict(row)
            for row in tx.select_in(f"SELECT {_COLUMNS} FROM forecasts_rows WHERE id", changed_ids)
        }
        created: dict[str, dict[str, Any]] = {}
        new_scenarios: list[tuple[str, str, str, str]] = []
        renames: list[tuple[str, str, str]] = []
        counts: dict[tuple[str, str, str], int] = {}
        for event, _ in events:
            if isinstance(event, Scenario.Created):
                scenario_id = id_text(event.originator_id)
                scenario_type = event.assumptions["type"]
                scenarios[scenario_id] = {
                    "id": scenario_id,
                    "name": event.name,
                    "type": scenario_type,
                }
                new_scenarios.append(
                    (scenario_id, id_text(event.tenant_id), event.name, scenario_type)
                )
            elif isinstance(event, Scenario.Renamed):
                scenario_id = id_text(event.originator_id)
                if scenario_id in scenarios:
                    scenarios[scenario_id]["name"] = event.name
                renames.append((event.name, id_text(event.tenant_id), scenario_id))
            elif isinstance(event, Forecast.Requested):
                row = _new_row(event, scenarios[id_text(event.scenario_id)])
                created[row["id"]] = row
                _count(counts, row, +1)
            elif isinstance(event, _STATUS_EVENTS):
                forecast_id = id_text(event.originator_id)
                row = created.get(forecast_id) or stored[forecast_id]
                _count(counts, row, -1)
                _change_status(row, event)
                _count(counts, row, +1)
        tx.insert_rows(
            "forecasts_scenarios",
            [("id", "text"), ("tenant_id", "text"), ("name", "text"), ("type", "text")],
            new_scenarios,
            "ON CONFLICT (id) DO NOTHING",
        )
        tx.insert_rows(
            "forecasts_rows",
            _TYPED_COLUMNS,
            [[row[c] for c in _COLUMN_NAMES] for row in created.values()],
            "ON CONFLICT (tenant_id, id) DO NOTHING",
        )
        tx.update_rows(
            "forecasts_rows",
            [
                ("status", "text"),
                ("completed_at", "text"),
                ("failure_reason", "text"),
                ("result", "text"),
            ],
            [("tenant_id", "text"), ("id", "text")],
            [
                [
                    row["status"],
                    row["completed_at"],
                    row["failure_reason"],
                    row["result"],
                    row["tenant_id"],
                    row["id"],
                ]
                for row in stored.values()
            ],
        )
        # Renames apply after the rows of this batch exist; the last one of a scenario
        # is its name.
        latest_names = [
            [name, tenant_id, scenario_id]
            for (tenant_id, scenario_id), name in {(t, i): n for n, t, i in renames}.items()
        ]
        key = [("tenant_id", "text"), ("id", "text")]
        tx.update_rows("forecasts_scenarios", [("name", "text")], key, latest_names)
        tx.update_rows(
            "forecasts_rows",
            [("scenario_name", "text")],
            [("tenant_id", "text"), ("scenario_id", "text")],
            latest_names,
        )
        tx.insert_rows(
            "forecasts_counts",
            [("tenant_id", "text"), ("scenario_id", "text"), ("status", "text"), ("n", "bigint")],
            [[*k, n] for k, n in sorted(counts.items()) if n],
            "ON CONFLICT (tenant_id, scenario_id, status) DO UPDATE"
            " SET n = forecasts_counts.n + excluded.n",
        )


_STATUS_EVENTS = (Forecast.Started, Forecast.Completed, Forecast.Failed)
_COLUMN_NAMES = [c.strip() for c in _COLUMNS.split(",")]
_TYPED_COLUMNS = list(
    zip(
        _COLUMN_NAMES,
        ("text",) * 6 + ("bigint", "bigint", "text", "text", "text", "text"),
        strict=True,
    )
)


def _new_row(event: Forecast.Requested, scenario: dict[str, Any]) -> dict[str, Any]:
    return {
        "tenant_id": id_text(event.tenant_id),
        "id": id_text(event.originator_id),
        "scenario_id": scenario["id"],
        "scenario_name": scenario["name"],
        "scenario_type": scenario["type"],
        "status": QUEUED,
        "horizon_months": event.horizon_months,
        "paths": event.paths,
        "created_at": iso(event.timestamp),
        "completed_at": None,
        "failure_reason": None,
        "result": None,
    }


def _change_status(row: dict[str, Any], event: Any) -> None:
    if isinstance(event, Forecast.Started):
        row["status"] = RUNNING
    elif isinstance(event, Forecast.Completed):
        row["status"] = COMPLETED
        row["completed_at"] = iso(event.timestamp)
        row["result"] = json.dumps(event.result, separators=(",", ":"))
    elif isinstance(event, Forecast.Failed):
        row["status"] = FAILED
        row["completed_at"] = iso(event.timestamp)
        row["failure_reason"] = event.reason


def _count(counts: dict[tuple[str, str, str], int], row: dict[str, Any], delta: int) -> None:
    for key in _count_keys(row["tenant_id"], row["scenario_id"], row["status"]):
        counts[key] = counts.get(key, 0) + delta


def _count_keys(tenant_id: str, scenario_id: str, status: str) -> list[tuple[str, str, str]]:
    return [
        (tenant_id, ANY, ANY),
        (tenant_id, scenario_id, ANY),
        (tenant_id, ANY, status),
        (tenant_id, scenario_id, status),
    ]
