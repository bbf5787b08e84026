"""The dispatcher: follows ForecastRequested events and hands each to the job broker. The
log is the outbox: the position advances only in the transaction that follows a
successful send, so a broker outage delays jobs and never loses one (a crash between
send and commit sends again; the job is idempotent).

A forecast that already finished further on in the same batch needs no job: catching up
on a long log (a new deployment, a rebuilt dispatcher) would otherwise send one message
per forecast ever requested, and the workers would spend minutes discarding them while
new requests wait behind them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from domain.forecast import Forecast
from projections.readmodel import Positioned, Tx


class DispatchProjector:
    name: ClassVar[str] = "dispatch"

    def __init__(self, send: Callable[[str], None]) -> None:
        self._send = send

    def ddl(self) -> list[str]:
        return []

    def apply(self, tx: Tx, events: Sequence[Positioned]) -> None:
        finished = {
            event.originator_id
            for event, _ in events
            if isinstance(event, Forecast.Completed | Forecast.Failed)
        }
        for event, _ in events:
            if isinstance(event, Forecast.Requested) and event.originator_id not in finished:
                self._send(str(event.originator_id))
