"""Reading the event log fast, for replays: pages by position with one plain statement
(rows as tuples, bytes in binary), and each stored state decoded with msgspec into the
same domain event object the library's mapper would make. A replay reads every event
of the log once per rebuild, and the library's page (a dict per row) and its decoder (a
Python hook per JSON object) were a third of a rebuild's CPU.

The stored format stays the library's (JSONTranscoder: JSON with tagged values such as
``{"_type_": "uuid_hex", "_data_": "..."}``), decoded by the library's own transcodings;
whatever this reader does not handle (SQLite, a cipher or a compressor, JSON that
msgspec refuses, such as NaN) goes through the library's path, unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

import msgspec
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import JSONTranscoder, Notification, find_id_convertor
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import resolve_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from infra.eventstore import EventLog

Decoded = tuple[DomainEventProtocol[Any], Notification]

_json = msgspec.json.Decoder()
_IMMUTABLE = frozenset({UUID, datetime, date, Decimal, str, int, float})
_KEPT_VALUES = 1 << 16


class LogReader:
    """Pages of the log with each event decoded."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        mapper = log.mapper
        recorder = log.recorder
        transcoder = mapper.transcoder
        self._fast = (
            isinstance(recorder, PostgresApplicationRecorder)
            and isinstance(transcoder, JSONTranscoder)
            and mapper.cipher is None
            and mapper.compressor is None
        )
        self._names = transcoder.names if isinstance(transcoder, JSONTranscoder) else {}
        self._classes: dict[str, type[Any]] = {}
        self._values: dict[tuple[str, str], Any] = {}
        if isinstance(recorder, PostgresApplicationRecorder):
            self._recorder = recorder
            self._statement = SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {schema}.{table} WHERE notification_id > %s AND notification_id <= %s"
                " ORDER BY notification_id LIMIT %s"
            ).format(
                schema=Identifier(recorder.datastore.schema),
                table=Identifier(recorder.events_table_name),
            )

    def page(self, *, after: int, stop: int, limit: int) -> list[Decoded]:
        """The events with positions in (after, stop], at most ``limit``, in order."""
        if not self._fast:
            mapper = self._log.mapper
            found = self._log.recorder.select_notifications(
                start=after, limit=limit, stop=stop, inclusive_of_start=False
            )
            return [(mapper.to_domain_event(n), n) for n in found]
        with (
            self._recorder.datastore.get_connection() as conn,
            conn.cursor(row_factory=tuple_row) as cursor,
        ):
            cursor.execute(self._statement, (after, stop, limit), prepare=True, binary=True)
            rows = cursor.fetchall()
        return [self._decoded(*row) for row in rows]

    def _decoded(
        self, position: int, originator_id: Any, version: int, topic: str, state: bytes
    ) -> Decoded:
        stored = Notification(
            id=position,
            originator_id=originator_id,
            originator_version=version,
            topic=topic,
            state=bytes(state),
        )
        try:
            event_state = _json.decode(stored.state)
        except msgspec.DecodeError:
            return self._log.mapper.to_domain_event(stored), stored
        if not isinstance(event_state, dict):
            return self._log.mapper.to_domain_event(stored), stored
        return self._event(stored, self._untagged(event_state)), stored

    def _untagged(self, value: dict[str, Any]) -> Any:
        """What JSONTranscoder's object hook makes of ``value`` (children first)."""
        for key, item in value.items():
            kind = type(item)
            if kind is dict:
                value[key] = self._untagged(item)
            elif kind is list:
                value[key] = self._untagged_list(item)
        if len(value) == 2 and "_type_" in value and "_data_" in value:
            name, data = value["_type_"], value["_data_"]
            if type(data) is not str:
                return self._names[name].decode(data)
            # The same ids (a tenant's, a scenario's) recur in event after event; the
            # values kept are immutable (UUID, datetime, Decimal), so sharing one is safe.
            tagged = (cast(str, name), data)
            found = self._values.get(tagged)
            if found is None:
                found = self._names[name].decode(data)
                if type(found) in _IMMUTABLE:
                    if len(self._values) >= _KEPT_VALUES:
                        self._values.clear()
                    self._values[tagged] = found
            return found
        return value

    def _untagged_list(self, items: list[Any]) -> list[Any]:
        for index, item in enumerate(items):
            kind = type(item)
            if kind is dict:
                items[index] = self._untagged(item)
            elif kind is list:
                items[index] = self._untagged_list(item)
        return items

    def _event(self, stored: Notification, event_state: dict[str, Any]) -> DomainEventProtocol[Any]:
        """As the library's Mapper.to_domain_event, from the decoded state."""
        cls = self._classes.get(stored.topic)
        if cls is None:
            cls = self._classes[stored.topic] = resolve_topic(stored.topic)
        convert = find_id_convertor(cast(Hashable, cls), cast(Hashable, type(stored.originator_id)))
        event_state["originator_id"] = convert(stored.originator_id)
        event_state["originator_version"] = stored.originator_version
        class_version = getattr(cls, "class_version", 1)
        from_version = event_state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(event_state)
            from_version += 1
        event = object.__new__(cls)
        object.__setattr__(event, "__dict__", event_state)
        return cast(DomainEventProtocol[Any], event)


def same_events(a: Sequence[Decoded], b: Sequence[Decoded]) -> bool:
    """Whether two decodings of the same page agree (each event's class and fields)."""
    return len(a) == len(b) and all(
        type(x) is type(y) and x.__dict__ == y.__dict__ and m == n
        for (x, m), (y, n) in zip(a, b, strict=True)
    )
