"""The rebuild's log reader decodes every stored event into exactly the event the
library's mapper makes, with the same stored record beside it."""

from __future__ import annotations

from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.logreader import LogReader, same_events
from tests.conftest import Tenant
from tests.projections.test_rebuild import live, some_commands  # noqa: F401 (a fixture)


def test_every_event_read_for_a_replay_equals_the_librarys_decoding(
    event_log: EventLog,
    tenant: Tenant,
    live: TestClient,  # noqa: F811 (the fixture imported above)
) -> None:
    some_commands(live, tenant)
    end = event_log.position()
    reader = LogReader(event_log)
    read = []
    after = 0
    while page := reader.page(after=after, stop=end, limit=7):
        read.extend(page)
        after = page[-1][1].id
    stored = event_log.recorder.select_notifications(start=1, limit=end, stop=end)
    expected = [(event_log.mapper.to_domain_event(n), n) for n in stored]
    assert len(read) == len(expected) == len(stored) > 10
    assert same_events(read, expected)
