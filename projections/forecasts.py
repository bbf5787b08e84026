"""The forecasts read model: one row per forecast with its scenario's id, name and type
copied in, and per-tenant totals for every filter (scenario, status, both, none), so a
filtered page is one indexed statement with its total and no COUNT(*)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from domain.forecast import QUEUED, Forecast
from domain.scenario import Scenario
from projections.readmodel import Positioned, Tx, iso

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
            "CREATE TABLE IF NOT EXISTS forecasts_scenarios ("
            " id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, name TEXT NOT NULL,"
            " type TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS forecasts_counts ("
            " tenant_id TEXT NOT NULL, scenario_id TEXT NOT NULL, status TEXT NOT NULL,"
            " n BIGINT NOT NULL, PRIMARY KEY (tenant_id, scenario_id, status))",
        ]

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        wanted = sorted(
            {str(e.scenario_id) for e, _ in events if isinstance(e, Forecast.Requested)}
        )
        scenarios: dict[str, dict[str, Any]] = {
            row["id"]: dict(row)
            for row in tx.select_in(
                "SELECT id, name, type FROM forecasts_scenarios WHERE id", wanted
            )
        }
        new_scenarios: list[tuple[str, str, str, str]] = []
        renames: list[tuple[str, str, str]] = []
        new_rows: list[list[Any]] = []
        counts: dict[tuple[str, str, str], int] = {}
        for event, _ in events:
            if isinstance(event, Scenario.Created):
                scenario_id = str(event.originator_id)
                scenario_type = event.assumptions["type"]
                scenarios[scenario_id] = {
                    "id": scenario_id,
                    "name": event.name,
                    "type": scenario_type,
                }
                new_scenarios.append((scenario_id, str(event.tenant_id), event.name, scenario_type))
            elif isinstance(event, Scenario.Renamed):
                scenario_id = str(event.originator_id)
                if scenario_id in scenarios:
                    scenarios[scenario_id]["name"] = event.name
                renames.append((event.name, str(event.tenant_id), scenario_id))
            elif isinstance(event, Forecast.Requested):
                scenario = scenarios[str(event.scenario_id)]
                tenant_id = str(event.tenant_id)
                new_rows.append(
                    [
                        tenant_id,
                        str(event.originator_id),
                        scenario["id"],
                        scenario["name"],
                        scenario["type"],
                        QUEUED,
                        event.horizon_months,
                        event.paths,
                        iso(event.timestamp),
                        None,
                        None,
                        None,
                    ]
                )
                for key in _count_keys(tenant_id, scenario["id"], QUEUED):
                    counts[key] = counts.get(key, 0) + 1
        tx.executemany(
            "INSERT INTO forecasts_scenarios (id, tenant_id, name, type) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id) DO NOTHING",
            new_scenarios,
        )
        # Renames apply in log order, after the rows of this batch exist.
        tx.executemany(
            f"INSERT INTO forecasts_rows ({_COLUMNS}) VALUES ({','.join('?' * 12)})"
            " ON CONFLICT (tenant_id, id) DO NOTHING",
            new_rows,
        )
        tx.executemany(
            "UPDATE forecasts_scenarios SET name = ? WHERE tenant_id = ? AND id = ?", renames
        )
        tx.executemany(
            "UPDATE forecasts_rows SET scenario_name = ? WHERE tenant_id = ? AND scenario_id = ?",
            renames,
        )
        tx.executemany(
            "INSERT INTO forecasts_counts (tenant_id, scenario_id, status, n) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, scenario_id, status) DO UPDATE"
            " SET n = forecasts_counts.n + excluded.n",
            [[*key, n] for key, n in sorted(counts.items())],
        )


def _count_keys(tenant_id: str, scenario_id: str, status: str) -> list[tuple[str, str, str]]:
    return [
        (tenant_id, ANY, ANY),
        (tenant_id, scenario_id, ANY),
        (tenant_id, ANY, status),
        (tenant_id, scenario_id, status),
    ]
