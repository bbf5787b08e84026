"""Point in time: a tenant's dashboard as it was, computed by replaying the tenant's events
through the dashboard projection's own code into a throwaway in-memory SQLite model, so
the past answer is made by exactly the code that made the live one."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing
from typing import Any
from uuid import UUID

from projections.dashboard import DashboardProjector
from projections.readmodel import Positioned, Tx

# Events applied per transaction of the throwaway model, as the live worker batches them.
BATCH_SIZE = 500


def replay_dashboard(
    tenant_id: UUID, events: Iterable[Positioned], *, batch_size: int = BATCH_SIZE
) -> Mapping[str, Any]:
    """The tenant's ``dashboard_tenants`` row after applying ``events`` (the tenant's
    decoded events in log order, consumed lazily); every column is None when none of them
    touched the dashboard, as the live read's outer join gives before any activity."""
    projector = DashboardProjector()
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.row_factory = sqlite3.Row
        for statement in projector.ddl():
            conn.execute(statement)
        tx = Tx(conn.cursor(), postgres=False)
        iterator = iter(events)
        while batch := list(itertools.islice(iterator, batch_size)):
            projector.apply(tx, batch)
        tx.execute(
            "SELECT d.* FROM (SELECT 1 AS one) q LEFT JOIN dashboard_tenants d ON d.tenant_id = ?",
            [str(tenant_id)],
        )
        [row] = tx.fetchall()
        return dict(row)
