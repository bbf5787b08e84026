"""Stored events are a permanent contract: a sample of every event version ever shipped, kept
as the store wrote it, must still decode to its class with its fields and still replay.

Each event_samples_v<N>.jsonl was written once by
`python -m tests.domain.test_event_samples --write <N>` and is never rewritten: a new event
(or a new version of one) gets a new samples file holding only the new and changed events.
v1: every event as first shipped. v2: the forecast's life (Started, Completed, Failed) and
Forecast.Requested with its scenario_version.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import types
import typing
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
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
from domain.forecast import COMPLETED, FAILED, RUNNING, TIMEOUT, Forecast
from domain.receipt import CommandReceipt
from domain.scenario import ARCHIVED, Scenario
from domain.tenant import Tenant
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from tests.domain.test_event_roundtrip import declared_events

SAMPLES_DIR = Path(__file__).parent

# What the samples were written from; the expectations below are these values.
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

# v2: one forecast requested of the scenario at version 4, started and completed; another
# requested, started and failed (only its Failed event is kept: one sample per topic).
COMPLETED_FORECAST_ID = UUID("5d0e7b1c-3a2f-4e6d-9b8a-7c6d5e4f3a2b")
FAILED_FORECAST_ID = UUID("e2f4a6c8-0b1d-4e3f-a5b7-c9d1e3f5a7b9")
T1 = datetime(2026, 3, 2, 14, 5, 7, 250000, tzinfo=UTC)
STARTED_AT = T1 + timedelta(seconds=3)
FINISHED_AT = T1 + timedelta(seconds=4, microseconds=875000)
SCENARIO_VERSION = 4
COMPUTE_SECONDS = 1.875
FAILURE_MESSAGE = "forecast exceeded its 30 s limit — abandoned"
# A completed forecast's result as API.md shapes it (six months, amounts rounded to cents,
# negative cash, whole amounts that JSON writes as floats).
FORECAST_RESULT: dict[str, object] = {
    "months": ["2026-01", "2026-02", "2026-03", "2026-04", "2026-05", "2026-06"],
    "revenue": [41000.0, 41820.0, 42656.4, 43509.53, 44379.72, 45267.31],
    "costs": [48000.5, 48480.51, 48965.31, 49454.97, 49949.52, 50449.01],
    "net": [-7000.5, -6660.51, -6308.91, -5945.44, -5569.8, -5181.7],
    "cash": [-8251.25, -14911.76, -21220.67, -27166.11, -32735.91, -37917.61],
    "bands": {
        "revenue": {
            "p10": [38950.0, 38710.12, 38512.45, 38301.9, 38120.33, 37954.08],
            "p50": [41000.0, 41790.55, 42601.1, 43433.27, 44280.06, 45145.92],
            "p90": [43050.0, 44901.37, 46788.02, 48712.66, 50688.19, 52701.4],
        },
        "cash": {
            "p10": [-10301.25, -19112.0, -27890.35, -36644.8, -45380.07, -54099.99],
            "p50": [-8251.25, -14940.2, -21311.78, -27340.05, -33020.41, -38347.62],
            "p90": [-6201.25, -10620.88, -14590.13, -18091.02, -21105.5, -23615.34],
        },
    },
    "runwayMonth": "2026-01",
    "probabilityCashNegative": 0.9995,
    "paths": 2000,
}


def v1_aggregates() -> list[BaseAggregate[UUID]]:
    """Every event as first shipped (today's domain records Forecast.Requested with a
    scenario_version, which the shipped v1 sample predates)."""
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
    return [tenant, key, scenario, forecast, command_receipt]


def v2_aggregates() -> list[BaseAggregate[UUID]]:
    """The v1 scenario before its archive (version 4), and two forecasts of it: one
    requested, started and completed, one requested, started and timed out."""
    writer = Actor(tenant_id=TENANT_ID, actor_id=str(KEY_ID), request_id="req-2")
    worker = Actor(tenant_id=TENANT_ID, actor_id=OPERATOR, request_id="worker-1")
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
    completed = Forecast.request(
        writer,
        forecast_id=COMPLETED_FORECAST_ID,
        scenario=scenario,
        horizon_months=6,
        paths=2000,
        at=T1,
    )
    completed.start(worker, at=STARTED_AT)
    completed.complete(
        worker, result=FORECAST_RESULT, compute_seconds=COMPUTE_SECONDS, at=FINISHED_AT
    )
    failed = Forecast.request(
        writer,
        forecast_id=FAILED_FORECAST_ID,
        scenario=scenario,
        horizon_months=120,
        paths=100_000,
        at=T1,
    )
    failed.start(worker, at=STARTED_AT)
    failed.fail(worker, reason=TIMEOUT, message=FAILURE_MESSAGE, at=FINISHED_AT)
    return [scenario, completed, failed]


# Per samples version: its file, the aggregates it was written from, and which of their
# stored events it holds (only the new and changed ones).
Selection = Callable[[StoredEvent], bool]
VERSIONS: dict[int, tuple[Path, Callable[[], list[BaseAggregate[UUID]]], Selection]] = {
    1: (SAMPLES_DIR / "event_samples_v1.jsonl", v1_aggregates, lambda stored: True),
    2: (
        SAMPLES_DIR / "event_samples_v2.jsonl",
        v2_aggregates,
        lambda stored: (
            stored.originator_id == COMPLETED_FORECAST_ID
            or stored.topic == "accubooks:Forecast.Failed"
        ),
    ),
}


def write_samples(version: int) -> Path:
    """Records the events of one samples version through a real (SQLite) store and writes
    those it selects, as stored. Run by hand, once per samples version; an existing file is
    never overwritten."""
    path, build, selected = VERSIONS[version]
    if path.exists():
        raise SystemExit(f"{path} exists: shipped samples are never rewritten")
    aggregates = build()

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
                if selected(stored)
            ]
        finally:
            log.close()
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


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


# Per samples version, its samples. A file is missing only before its --write; then no
# sample covers its topics, which fails below.
SAMPLES: dict[int, list[StoredEvent]] = {
    version: read_samples(path) if path.exists() else []
    for version, (path, _, _) in VERSIONS.items()
}

# Per samples version and pinned topic (one sample of each topic a version holds): the
# class it must decode to and some of the values it must carry.
EXPECTED: dict[tuple[int, str], tuple[type[object], dict[str, object]]] = {
    (1, "accubooks:Tenant.Registered"): (
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
    (1, "accubooks:ApiKey.Issued"): (
        ApiKey.Issued,
        {
            "originator_id": KEY_ID,
            "originator_topic": "accubooks:ApiKey",
            "role": "writer",
            "key_hash": WRITER_KEY_HASH,
            "tenant_id": TENANT_ID,
        },
    ),
    (1, "accubooks:ApiKey.Revoked"): (
        ApiKey.Revoked,
        {"originator_id": KEY_ID, "originator_version": 2, "actor_id": OPERATOR},
    ),
    (1, "accubooks:Scenario.Created"): (
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
    (1, "accubooks:Scenario.Renamed"): (
        Scenario.Renamed,
        {"originator_version": 2, "name": "Hire three engineers"},
    ),
    (1, "accubooks:Scenario.BaselineChanged"): (
        Scenario.BaselineChanged,
        {"originator_version": 3, "baseline": BASELINE_CHANGED},
    ),
    (1, "accubooks:Scenario.AssumptionsChanged"): (
        Scenario.AssumptionsChanged,
        {"originator_version": 4, "assumptions": ASSUMPTIONS_CHANGED},
    ),
    (1, "accubooks:Scenario.Archived"): (
        Scenario.Archived,
        {"originator_id": SCENARIO_ID, "originator_version": 5, "timestamp": T0},
    ),
    (1, "accubooks:Forecast.Requested"): (
        Forecast.Requested,
        {
            "originator_id": FORECAST_ID,
            "originator_topic": "accubooks:Forecast",
            "scenario_id": SCENARIO_ID,
            "horizon_months": 24,
            "paths": 2000,
            # Stored before the field existed: it decodes to the field's default.
            "scenario_version": 0,
        },
    ),
    (1, "accubooks:CommandReceipt.Recorded"): (
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
    (2, "accubooks:Forecast.Requested"): (
        Forecast.Requested,
        {
            "originator_id": COMPLETED_FORECAST_ID,
            "originator_version": 1,
            "originator_topic": "accubooks:Forecast",
            "scenario_id": SCENARIO_ID,
            "horizon_months": 6,
            "paths": 2000,
            "scenario_version": SCENARIO_VERSION,
            "actor_id": str(KEY_ID),
            "request_id": "req-2",
            "timestamp": T1,
        },
    ),
    (2, "accubooks:Forecast.Started"): (
        Forecast.Started,
        {
            "originator_id": COMPLETED_FORECAST_ID,
            "originator_version": 2,
            "attempt": 1,
            "tenant_id": TENANT_ID,
            "actor_id": OPERATOR,
            "request_id": "worker-1",
            "timestamp": STARTED_AT,
        },
    ),
    (2, "accubooks:Forecast.Completed"): (
        Forecast.Completed,
        {
            "originator_id": COMPLETED_FORECAST_ID,
            "originator_version": 3,
            "result": FORECAST_RESULT,
            "compute_seconds": COMPUTE_SECONDS,
            "timestamp": FINISHED_AT,
        },
    ),
    (2, "accubooks:Forecast.Failed"): (
        Forecast.Failed,
        {
            "originator_id": FAILED_FORECAST_ID,
            "originator_version": 3,
            "reason": TIMEOUT,
            "message": FAILURE_MESSAGE,
            "tenant_id": TENANT_ID,
            "timestamp": FINISHED_AT,
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
    on_disk = set(SAMPLES_DIR.glob("event_samples_v*.jsonl"))
    sampled = {sample.topic for samples in SAMPLES.values() for sample in samples}
    declared = set(declared_events())

    assert on_disk == {path for path, _, _ in VERSIONS.values()}, "add the file to VERSIONS"
    assert declared - sampled == set(), "ship a samples file with the new events"
    assert set(EXPECTED) == {
        (version, sample.topic) for version, samples in SAMPLES.items() for sample in samples
    }
    # EXPECTED names a sample by its version and topic, so no file holds a topic twice.
    assert all(
        len(samples) == len({sample.topic for sample in samples}) for samples in SAMPLES.values()
    )


def breaks_of(event_log: EventLog, version: int, sample: StoredEvent) -> list[str]:
    """What no longer holds of one stored sample: its class, its pinned topic, its fields."""
    expected_class, expected_values = EXPECTED[version, sample.topic]
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
    breaks = {
        (version, sample.topic): breaks_of(event_log, version, sample)
        for version, samples in SAMPLES.items()
        for sample in samples
    }

    assert {key: found for key, found in breaks.items() if found} == {}


def replay(
    events: list[CanMutateAggregate[UUID]], aggregate: BaseAggregate[UUID] | None = None
) -> BaseAggregate[UUID]:
    for event in events:
        aggregate = event.mutate(aggregate)
    assert aggregate is not None
    return aggregate


def test_stored_samples_still_rebuild_their_aggregates(event_log: EventLog) -> None:
    histories: dict[UUID | str, list[CanMutateAggregate[UUID]]] = defaultdict(list)
    for samples in SAMPLES.values():
        for sample in samples:
            event = event_log.mapper.to_domain_event(sample)
            assert isinstance(event, CanMutateAggregate)
            histories[sample.originator_id].append(event)
    # The failed forecast's sample is the last event of its history; the rest is not stored.
    partial = histories.pop(FAILED_FORECAST_ID)

    rebuilt = {aggregate_id: replay(events) for aggregate_id, events in histories.items()}

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
    requested = rebuilt[FORECAST_ID]
    assert isinstance(requested, Forecast)
    assert requested.scenario_id == SCENARIO_ID
    assert requested.scenario_version == 0
    assert not requested.finished
    completed = rebuilt[COMPLETED_FORECAST_ID]
    assert isinstance(completed, Forecast)
    assert completed.version == 3
    assert completed.scenario_version == SCENARIO_VERSION
    assert completed.status == COMPLETED
    assert completed.attempts == 1
    assert completed.result == FORECAST_RESULT
    assert completed.compute_seconds == COMPUTE_SECONDS
    assert completed.modified_on == FINISHED_AT
    command_receipt = rebuilt[RECEIPT_ID]
    assert isinstance(command_receipt, CommandReceipt)
    assert command_receipt.status == 201
    tenant = rebuilt[TENANT_ID]
    assert isinstance(tenant, Tenant)
    assert tenant.name == "Société Générale d'Essai ✓"

    # Its stored Failed still applies to the same forecast as today's domain records it
    # up to that point (requested and started).
    [recorded] = [aggregate for aggregate in v2_aggregates() if aggregate.id == FAILED_FORECAST_ID]
    before = [event for event in recorded.collect_events() if event.originator_version < 3]
    running = replay(before)
    assert isinstance(running, Forecast)
    assert running.status == RUNNING
    failed = replay(partial, running)
    assert isinstance(failed, Forecast)
    assert failed.status == FAILED
    assert failed.failure_reason == TIMEOUT
    assert failed.version == 3


def test_derived_ids_are_derived_as_when_the_samples_were_stored() -> None:
    assert api_key.hash_key(WRITER_KEY) == WRITER_KEY_HASH
    assert api_key.key_id_for(WRITER_KEY_HASH) == KEY_ID
    assert receipt.receipt_id_for(TENANT_ID, IDEMPOTENCY_KEY) == RECEIPT_ID


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--write" or not sys.argv[2].isdigit():
        raise SystemExit("usage: python -m tests.domain.test_event_samples --write VERSION")
    if int(sys.argv[2]) not in VERSIONS:
        raise SystemExit(f"no samples version {sys.argv[2]}: versions are {sorted(VERSIONS)}")
    print(f"wrote {write_samples(int(sys.argv[2]))}")
