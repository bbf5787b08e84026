"""Stored events are a permanent contract: a sample of every event version ever shipped, kept
as the store wrote it, must still decode to its class with its fields and still replay.

event_samples_v1.jsonl was written once by `python -m tests.domain.test_event_samples --write`
and is never rewritten: a new event (or a new version of one) gets a new samples file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import types
import typing
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.domain import BaseAggregate, CanMutateAggregate
from eventsourcing.persistence import MapperDeserialisationError, StoredEvent
from eventsourcing.utils import TopicError

from domain import api_key, receipt
from domain import scenario_spec as spec
from domain.api_key import ApiKey
from domain.events import OPERATOR, Actor
from domain.forecast import Forecast
from domain.receipt import CommandReceipt
from domain.scenario import ARCHIVED, Scenario
from domain.tenant import Tenant
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from tests.domain.test_event_roundtrip import declared_events

SAMPLES_DIR = Path(__file__).parent
V1 = SAMPLES_DIR / "event_samples_v1.jsonl"

# What the v1 samples were written from; the expectations below are these values.
TENANT_ID = UUID("6f1c1d3e-0b7a-4c57-9a43-1e2f3a4b5c6d")
WRITER_KEY = "abk_sample-writer-key"
WRITER_KEY_HASH = "b1e5e0978ecf45ae3775ac36e7c6934bc717e7a167d65f748f2b91dc5ffca8ca"
SCENARIO_ID = UUID("0c6e3a52-4d5b-4f0e-9a7b-2b8f1c9d3e41")
FORECAST_ID = UUID("a4b2c6d8-1e3f-4a5b-8c7d-9e0f1a2b3c4d")
IDEMPOTENCY_KEY = "create-hiring-plan"
T0 = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)

# Ids that are derived, not drawn: authentication and idempotency look them up, so their
# derivation is part of the contract too.
KEY_ID = UUID("ccd68d7a-2982-5780-b7d9-0caf40258204")
RECEIPT_ID = UUID("40690217-5822-5723-8107-780843ef8c4e")

BASELINE_CREATED = {
    "startMonth": "2026-01",
    "openingCash": "250000.00",
    "monthlyRevenue": "40000.00",
    "monthlyCosts": "35000.50",
    "revenueGrowthRate": 0.02,
    "costGrowthRate": 0.01,
    "revenueVolatility": 0.05,
}
BASELINE_CHANGED = {**BASELINE_CREATED, "openingCash": "-1250.75", "monthlyRevenue": "41000.00"}
ASSUMPTIONS_CREATED = {
    "type": "HIRING",
    "headcount": 2,
    "monthlyCostPerHead": "6500.00",
    "startOffsetMonths": 1,
}
ASSUMPTIONS_CHANGED = {**ASSUMPTIONS_CREATED, "headcount": 3, "startOffsetMonths": 0}


def write_samples(path: Path) -> None:
    """Records one of each event through a real (SQLite) store and writes what it stored.
    Run by hand, once per samples version; an existing file is never overwritten."""
    if path.exists():
        raise SystemExit(f"{path} exists: shipped samples are never rewritten")
    operator = Actor(tenant_id=TENANT_ID, actor_id=OPERATOR, request_id="cli-1")
    tenant = Tenant.register(operator, "Société Générale d'Essai ✓", at=T0)
    key = ApiKey.issue(operator, WRITER_KEY_HASH, "writer", at=T0)
    writer = Actor(tenant_id=TENANT_ID, actor_id=str(key.id), request_id="req-1")
    scenario = Scenario.create(
        writer,
        scenario_id=SCENARIO_ID,
        name="Hire two engineers",
        baseline=spec.baseline_from_payload(BASELINE_CREATED),
        assumptions=spec.assumptions_from_payload(ASSUMPTIONS_CREATED),
        at=T0,
    )
    scenario.update(writer, name="Hire three engineers", at=T0)
    scenario.update(writer, baseline=spec.baseline_from_payload(BASELINE_CHANGED), at=T0)
    scenario.update(writer, assumptions=spec.assumptions_from_payload(ASSUMPTIONS_CHANGED), at=T0)
    forecast = Forecast.request(
        writer, forecast_id=FORECAST_ID, scenario=scenario, horizon_months=24, paths=2000, at=T0
    )
    scenario.archive(writer, at=T0)
    command_receipt = CommandReceipt.record(
        writer,
        idempotency_key=IDEMPOTENCY_KEY,
        route="POST /api/scenarios",
        fingerprint="9f2c" * 16,
        status=201,
        body='{"id":"0c6e3a52-4d5b-4f0e-9a7b-2b8f1c9d3e41"}',
        headers={"ETag": '"1"', "Location": f"/api/scenarios/{SCENARIO_ID}"},
        at=T0,
    )
    key.revoke(operator, at=T0)
    aggregates: list[BaseAggregate[UUID]] = [tenant, key, scenario, forecast, command_receipt]

    with tempfile.TemporaryDirectory() as data_dir:
        log = open_event_log(Settings(data_dir=data_dir))
        try:
            log.save(*aggregates)
            lines = [
                json.dumps(
                    {
                        "topic": stored.topic,
                        "originator_id": str(stored.originator_id),
                        "originator_version": stored.originator_version,
                        "state": stored.state.decode("utf-8"),
                    },
                    ensure_ascii=False,
                )
                for aggregate in aggregates
                for stored in log.recorder.select_events(aggregate.id)
            ]
        finally:
            log.close()
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_samples(path: Path) -> list[StoredEvent]:
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = json.loads(line)
        samples.append(
            StoredEvent(
                originator_id=UUID(fields["originator_id"]),
                originator_version=fields["originator_version"],
                topic=fields["topic"],
                state=fields["state"].encode("utf-8"),
            )
        )
    return samples


# Missing only before the first --write; then no sample covers any topic, which fails below.
SAMPLES_V1 = read_samples(V1) if V1.exists() else []

# Per pinned topic: the class it must decode to and some of the values it must carry.
EXPECTED: dict[str, tuple[type[object], dict[str, object]]] = {
    "accubooks:Tenant.Registered": (
        Tenant.Registered,
        {
            "originator_id": TENANT_ID,
            "originator_topic": "accubooks:Tenant",
            "name": "Société Générale d'Essai ✓",
            "tenant_id": TENANT_ID,
            "actor_id": OPERATOR,
            "timestamp": T0,
        },
    ),
    "accubooks:ApiKey.Issued": (
        ApiKey.Issued,
        {
            "originator_id": KEY_ID,
            "originator_topic": "accubooks:ApiKey",
            "role": "writer",
            "key_hash": WRITER_KEY_HASH,
            "tenant_id": TENANT_ID,
        },
    ),
    "accubooks:ApiKey.Revoked": (
        ApiKey.Revoked,
        {"originator_id": KEY_ID, "originator_version": 2, "actor_id": OPERATOR},
    ),
    "accubooks:Scenario.Created": (
        Scenario.Created,
        {
            "originator_id": SCENARIO_ID,
            "originator_topic": "accubooks:Scenario",
            "name": "Hire two engineers",
            "baseline": BASELINE_CREATED,
            "assumptions": ASSUMPTIONS_CREATED,
            "actor_id": str(KEY_ID),
            "request_id": "req-1",
        },
    ),
    "accubooks:Scenario.Renamed": (
        Scenario.Renamed,
        {"originator_version": 2, "name": "Hire three engineers"},
    ),
    "accubooks:Scenario.BaselineChanged": (
        Scenario.BaselineChanged,
        {"originator_version": 3, "baseline": BASELINE_CHANGED},
    ),
    "accubooks:Scenario.AssumptionsChanged": (
        Scenario.AssumptionsChanged,
        {"originator_version": 4, "assumptions": ASSUMPTIONS_CHANGED},
    ),
    "accubooks:Scenario.Archived": (
        Scenario.Archived,
        {"originator_id": SCENARIO_ID, "originator_version": 5, "timestamp": T0},
    ),
    "accubooks:Forecast.Requested": (
        Forecast.Requested,
        {
            "originator_id": FORECAST_ID,
            "originator_topic": "accubooks:Forecast",
            "scenario_id": SCENARIO_ID,
            "horizon_months": 24,
            "paths": 2000,
        },
    ),
    "accubooks:CommandReceipt.Recorded": (
        CommandReceipt.Recorded,
        {
            "originator_id": RECEIPT_ID,
            "originator_topic": "accubooks:CommandReceipt",
            "idempotency_key": IDEMPOTENCY_KEY,
            "route": "POST /api/scenarios",
            "status": 201,
            "headers": {"ETag": '"1"', "Location": f"/api/scenarios/{SCENARIO_ID}"},
        },
    ),
}


def conforms(value: object, hint: Any) -> bool:
    """Whether a decoded value still has the type its field declares."""
    if isinstance(hint, typing.TypeVar):  # the library's originator id
        return isinstance(value, UUID)
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(
            conforms(k, key_hint) and conforms(v, value_hint) for k, v in value.items()
        )
    if hint is int and isinstance(value, bool):
        return False
    return isinstance(value, origin or hint)


def shape_drift(event: object) -> list[str]:
    """How the stored fields of an event no longer match its class: fields the class lost,
    required fields the sample lacks, and values of another type than declared."""
    assert dataclasses.is_dataclass(event)
    declared = {field.name: field for field in dataclasses.fields(event)}
    hints = typing.get_type_hints(type(event))
    stored = vars(event)
    drift = [
        f"field {name!r} is stored but no longer declared"
        for name in stored
        if name not in declared
    ]
    drift += [
        f"required field {name!r} is not in the stored event"
        for name, field in declared.items()
        if name not in stored
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    drift += [
        f"field {name!r} holds {type(value).__name__}, declared {hints[name]!r}"
        for name, value in stored.items()
        if name in declared and not conforms(value, hints[name])
    ]
    return drift


def test_every_event_class_has_a_stored_sample() -> None:
    sampled = {
        sample.topic
        for path in SAMPLES_DIR.glob("event_samples_v*.jsonl")
        for sample in read_samples(path)
    }
    declared = set(declared_events())

    assert declared - sampled == set(), "ship a samples file with the new events"
    assert set(EXPECTED) == {sample.topic for sample in SAMPLES_V1}


def breaks_of(event_log: EventLog, sample: StoredEvent) -> list[str]:
    """What no longer holds of one stored sample: its class, its pinned topic, its fields."""
    expected_class, expected_values = EXPECTED[sample.topic]
    try:
        event = event_log.mapper.to_domain_event(sample)
    except (TopicError, MapperDeserialisationError) as e:
        return [f"does not decode: {e}"]
    breaks = shape_drift(event)
    if type(event) is not expected_class:
        breaks.append(f"decodes to {type(event).__qualname__}, not {expected_class.__qualname__}")
    # The library would still resolve a renamed topic through its aggregate's topic; the
    # contract is that the stored topic stays the one pinned on the class.
    if declared_events().get(sample.topic) is not expected_class:
        breaks.append("its topic is no longer pinned on its class")
    breaks += [
        f"{name} is {getattr(event, name, None)!r}, not {value!r}"
        for name, value in expected_values.items()
        if getattr(event, name, None) != value
    ]
    return breaks


def test_every_stored_sample_decodes_to_its_event_with_its_values(event_log: EventLog) -> None:
    breaks = {sample.topic: breaks_of(event_log, sample) for sample in SAMPLES_V1}

    assert {topic: found for topic, found in breaks.items() if found} == {}


def test_stored_samples_still_rebuild_their_aggregates(event_log: EventLog) -> None:
    histories: dict[UUID | str, list[CanMutateAggregate[UUID]]] = defaultdict(list)
    for sample in SAMPLES_V1:
        event = event_log.mapper.to_domain_event(sample)
        assert isinstance(event, CanMutateAggregate)
        histories[sample.originator_id].append(event)

    rebuilt: dict[UUID | str, BaseAggregate[UUID]] = {}
    for aggregate_id, events in histories.items():
        aggregate: BaseAggregate[UUID] | None = None
        for event in events:
            aggregate = event.mutate(aggregate)
        assert aggregate is not None
        rebuilt[aggregate_id] = aggregate

    scenario = rebuilt[SCENARIO_ID]
    assert isinstance(scenario, Scenario)
    assert scenario.version == 5
    assert scenario.name == "Hire three engineers"
    assert scenario.baseline == spec.baseline_from_payload(BASELINE_CHANGED)
    assert scenario.assumptions == spec.Hiring(headcount=3, monthly_cost_per_head=Decimal(6500))
    assert scenario.status == ARCHIVED
    key = rebuilt[KEY_ID]
    assert isinstance(key, ApiKey)
    assert key.revoked
    assert key.tenant_id == TENANT_ID
    forecast = rebuilt[FORECAST_ID]
    assert isinstance(forecast, Forecast)
    assert forecast.scenario_id == SCENARIO_ID
    command_receipt = rebuilt[RECEIPT_ID]
    assert isinstance(command_receipt, CommandReceipt)
    assert command_receipt.status == 201
    tenant = rebuilt[TENANT_ID]
    assert isinstance(tenant, Tenant)
    assert tenant.name == "Société Générale d'Essai ✓"


def test_derived_ids_are_derived_as_when_the_samples_were_stored() -> None:
    assert api_key.hash_key(WRITER_KEY) == WRITER_KEY_HASH
    assert api_key.key_id_for(WRITER_KEY_HASH) == KEY_ID
    assert receipt.receipt_id_for(TENANT_ID, IDEMPOTENCY_KEY) == RECEIPT_ID


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.domain.test_event_samples --write")
    write_samples(V1)
    print(f"wrote {V1}")
