"""Comparing a rebuilt read model with the live one, table by table, in the database: a
full join of both copies on the primary key, so only the differing rows (at most LISTED
of each kind, all counted) ever reach Python, whatever the size of the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from projections.errors import RebuildError
from projections.readmodel import Tx

# Differing rows listed per table and kind (all are counted).
LISTED = 20
# Float columns are compared to this many decimal places: a sum of floats depends on how
# the events were grouped into batches, which differs between a live worker and a rebuild.
FLOAT_PLACES = 6


class RowRef(msgspec.Struct, frozen=True, kw_only=True):
    # onlyLive, onlyRebuilt, or changed (same primary key, other values)
    kind: str
    key: dict[str, Any]


class TableDiff(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    table: str
    only_live: int = 0
    only_rebuilt: int = 0
    changed: int = 0
    # Columns ("name type") that only one copy has: a projector's DDL changed.
    columns_only_live: list[str] = []
    columns_only_rebuilt: list[str] = []
    # The first LISTED rows of each kind, by primary key.
    rows: list[RowRef] = []

    @property
    def differences(self) -> int:
        columns = len(self.columns_only_live) + len(self.columns_only_rebuilt)
        return self.only_live + self.only_rebuilt + self.changed + columns


def diff_table(tx: Tx, table: str, *, postgres: bool, live: str, rebuilt: str) -> TableDiff:
    """``table`` of the live copy (in schema or database ``live``) against the rebuilt
    one (``rebuilt``), matched by primary key, in the transaction of ``tx``."""
    live_columns, key = _columns(tx, live, table, postgres=postgres)
    rebuilt_columns, _ = _columns(tx, rebuilt, table, postgres=postgres)
    if not key:
        raise RebuildError(f"{table} has no primary key: its rows cannot be matched")
    compared = [c for c in live_columns if c in rebuilt_columns]
    floats = {name for name, kind in compared if _is_float(kind)}
    found = _rows(
        tx,
        _diff_sql(
            f"{quoted(live)}.{quoted(table)}",
            f"{quoted(rebuilt)}.{quoted(table)}",
            key,
            [name for name, _ in compared],
            floats,
            postgres=postgres,
        ),
    )
    counts = {row["diff_kind"]: int(row["diff_count"]) for row in found}
    return TableDiff(
        table=table,
        only_live=counts.get("onlyLive", 0),
        only_rebuilt=counts.get("onlyRebuilt", 0),
        changed=counts.get("changed", 0),
        columns_only_live=[f"{n} {k}" for n, k in live_columns if (n, k) not in compared],
        columns_only_rebuilt=[f"{n} {k}" for n, k in rebuilt_columns if (n, k) not in compared],
        rows=[RowRef(kind=row["diff_kind"], key={k: _plain(row[k]) for k in key}) for row in found],
    )


def _columns(
    tx: Tx, schema: str, table: str, *, postgres: bool
) -> tuple[list[tuple[str, str]], list[str]]:
    """Its columns (name, declared type) in order, and its primary key's columns."""
    if postgres:
        ref = f"{quoted(schema)}.{quoted(table)}"
        columns = _rows(
            tx,
            "SELECT attname AS name, format_type(atttypid, atttypmod) AS kind"
            " FROM pg_attribute WHERE attrelid = CAST(? AS regclass) AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            [ref],
        )
        key = _rows(
            tx,
            "SELECT a.attname AS name FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = CAST(? AS regclass) AND i.indisprimary"
            " ORDER BY array_position(CAST(i.indkey AS int2[]), a.attnum)",
            [ref],
        )
        return [(c["name"], c["kind"]) for c in columns], [k["name"] for k in key]
    columns = _rows(
        tx,
        "SELECT name, type AS kind, pk FROM pragma_table_info(?, ?) ORDER BY cid",
        [table, schema],
    )
    key_columns = sorted((c for c in columns if c["pk"]), key=lambda c: int(c["pk"]))
    return [(c["name"], c["kind"]) for c in columns], [c["name"] for c in key_columns]


def _rows(tx: Tx, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    tx.execute(sql, params)
    return [dict(row) for row in tx.fetchall()]


def quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _diff_sql(
    live_ref: str,
    rebuilt_ref: str,
    key: Sequence[str],
    columns: Sequence[str],
    floats: set[str],
    *,
    postgres: bool,
) -> str:
    """Rows of the full join of both copies on the primary key where one side is missing
    or a value differs; each row's kind, its key, and its kind's count, at most LISTED
    rows per kind. One statement, evaluated by the database (nothing loaded but these)."""
    distinct = "IS DISTINCT FROM" if postgres else "IS NOT"

    def value(alias: str, column: str) -> str:
        ref = f"{alias}.{quoted(column)}"
        if column not in floats:
            return ref
        if postgres:
            return f"ROUND(CAST({ref} AS NUMERIC), {FLOAT_PLACES})"
        return f"ROUND({ref}, {FLOAT_PLACES})"

    first = quoted(key[0])
    changed = [f"{value('l', c)} {distinct} {value('s', c)}" for c in columns if c not in key]
    where = " OR ".join([f"s.{first} IS NULL", f"l.{first} IS NULL", *changed])
    on = " AND ".join(f"l.{quoted(k)} = s.{quoted(k)}" for k in key)
    keys = ", ".join(f"COALESCE(l.{quoted(k)}, s.{quoted(k)}) AS {quoted(k)}" for k in key)
    order = ", ".join(quoted(k) for k in key)
    kind = (
        f"CASE WHEN s.{first} IS NULL THEN 'onlyLive'"
        f" WHEN l.{first} IS NULL THEN 'onlyRebuilt' ELSE 'changed' END"
    )
    return (
        "SELECT * FROM (SELECT d.*,"
        f" ROW_NUMBER() OVER (PARTITION BY diff_kind ORDER BY {order}) AS diff_row,"
        " COUNT(*) OVER (PARTITION BY diff_kind) AS diff_count"
        f" FROM (SELECT {kind} AS diff_kind, {keys}"
        f" FROM {live_ref} l FULL JOIN {rebuilt_ref} s ON {on} WHERE {where}) d) x"
        f" WHERE diff_row <= {LISTED} ORDER BY diff_kind, {order}"
    )


def _is_float(declared: str) -> bool:
    kind = declared.upper()
    return any(part in kind for part in ("REAL", "FLOA", "DOUB"))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value if isinstance(value, str | int | float | None) else str(value)


def describe_table(table: TableDiff) -> list[str]:
    """A table's differences as text lines (none when it matches)."""
    if not table.differences:
        return []
    counts = ", ".join(
        f"{n} {label}"
        for n, label in (
            (table.only_live, "only live"),
            (table.only_rebuilt, "only rebuilt"),
            (table.changed, "changed"),
        )
        if n
    )
    lines = [f"{table.table}: {counts or 'columns differ'}"]
    lines += [f"  column only live: {c}" for c in table.columns_only_live]
    lines += [f"  column only rebuilt: {c}" for c in table.columns_only_rebuilt]
    for row in table.rows:
        key = ", ".join(f"{k}={v}" for k, v in row.key.items())
        lines.append(f"  {row.kind}: {key}")
    return lines
