"""The plans of a scale run's statements: each statement a readapi function sends, captured
on its way to PostgreSQL and explained (ANALYZE, BUFFERS) twice, planned for its values
(custom plan: the API's first runs of it) and for any values (generic plan: what a
statement psycopg prepared may settle on), then answered as usual."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import sql as pgsql

from infra.readstore import ReadStore, Row
from infra.settings import Settings

# The tenant's tables: rows read from them are what a page costs.
TABLES = ("scenarios_rows", "forecasts_rows")


class PlanFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What one EXPLAIN (ANALYZE, BUFFERS) says: the server's execution time, the rows it
    read from the tenant's table (returned by its scans plus removed by their filters),
    the most rows any sort node sorted, the shared buffers touched, the index scans."""

    execution_ms: float
    rows_read: int
    rows_sorted: int
    buffers: int
    indexes: list[str]
    text: str


class RoutePlan(msgspec.Struct, frozen=True, kw_only=True):
    route: str
    sql: str
    params: list[Any]
    # The rows the page needs: limit + 1 (to know whether more follow), plus an offset.
    rows_needed: int
    custom: PlanFacts
    generic: PlanFacts


class ExplainingStore(ReadStore):
    """A read store that, for each statement the readapi functions issue, keeps its
    EXPLAIN (ANALYZE, BUFFERS) as a custom plan (how the API's first runs of it go) and as
    a generic one (what a statement prepared by psycopg may settle on), then answers it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.seen: list[tuple[str, list[Any], PlanFacts, PlanFacts]] = []
        self._conn = psycopg.connect(
            settings.database_url or "", autocommit=True, connect_timeout=5
        )

    def query(self, projection: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        text = sql.replace("?", "%s")
        custom = _facts(
            self._conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {text}", params),
            self._conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {text}", params),
        )
        numbered = sql
        for n in range(1, len(params) + 1):
            numbered = numbered.replace("?", f"${n}", 1)
        self._conn.execute(f"PREPARE scale_q AS {numbered}")
        try:
            self._conn.execute("SET plan_cache_mode = force_generic_plan")
            execute = pgsql.SQL("EXECUTE scale_q ({})").format(
                pgsql.SQL(", ").join(pgsql.Literal(p) for p in params)
            )
            generic = _facts(
                self._conn.execute(pgsql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + execute),
                self._conn.execute(pgsql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + execute),
            )
        finally:
            self._conn.execute("RESET plan_cache_mode")
            self._conn.execute("DEALLOCATE scale_q")
        self.seen.append((sql, list(params), custom, generic))
        return super().query(projection, sql, params)

    def close(self) -> None:
        self._conn.close()
        super().close()


def _facts(as_json: psycopg.Cursor[Any], as_text: psycopg.Cursor[Any]) -> PlanFacts:
    [[document]] = as_json.fetchall()
    [top] = document if isinstance(document, list) else msgspec.json.decode(document)
    rows_read = rows_sorted = 0
    indexes: list[str] = []
    stack = [top["Plan"]]
    while stack:
        node = stack.pop()
        stack.extend(node.get("Plans", []))
        loops = int(node.get("Actual Loops", 1))
        if node.get("Relation Name") in TABLES:
            rows_read += int(node["Actual Rows"]) * loops
            rows_read += int(node.get("Rows Removed by Filter", 0)) * loops
            if "Index Name" in node:
                indexes.append(f"{node['Node Type']} using {node['Index Name']}")
            else:
                indexes.append(node["Node Type"])
        if node["Node Type"] in ("Sort", "Incremental Sort"):
            rows_sorted = max(rows_sorted, int(node["Actual Rows"]) * loops)
    plan = top["Plan"]
    buffers = sum(int(plan.get(k, 0)) for k in ("Shared Hit Blocks", "Shared Read Blocks"))
    return PlanFacts(
        execution_ms=round(float(top["Execution Time"]), 3),
        rows_read=rows_read,
        rows_sorted=rows_sorted,
        buffers=buffers,
        indexes=indexes,
        text="\n".join(row[0] for row in as_text.fetchall()),
    )


# A route to explain: its name, its statement sent through a read store, the rows it needs.
Statement = tuple[str, Callable[[ReadStore], object], int]


def explain(database_url: str, statements: Sequence[Statement]) -> list[RoutePlan]:
    store = ExplainingStore(
        Settings(database_url=database_url, db_pool_size=1, db_pool_max_overflow=0)
    )
    plans: list[RoutePlan] = []
    try:
        for name, load, rows_needed in statements:
            store.seen.clear()
            load(store)
            if len(store.seen) != 1:
                raise SystemExit(f"{name}: {len(store.seen)} statements, not one")
            [(sql, params, custom, generic)] = store.seen
            plans.append(
                RoutePlan(
                    route=name,
                    sql=sql,
                    params=params,
                    rows_needed=rows_needed,
                    custom=custom,
                    generic=generic,
                )
            )
    finally:
        store.close()
    return plans


def plan_problems(plan: RoutePlan) -> list[str]:
    problems = []
    for kind, facts in (("custom", plan.custom), ("generic", plan.generic)):
        if facts.rows_read > plan.rows_needed:
            problems.append(
                f"{plan.route} ({kind} plan) reads {facts.rows_read:,} rows for"
                f" {plan.rows_needed:,} needed"
            )
        if facts.rows_sorted > plan.rows_needed:
            problems.append(f"{plan.route} ({kind} plan) sorts {facts.rows_sorted:,} rows")
    return problems
