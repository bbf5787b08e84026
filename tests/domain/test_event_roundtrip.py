"""Every event of every aggregate survives the real store: through the mapper unchanged, and
through save and load into an equal aggregate, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec.inspect as mi
import pytest
from eventsourcing.domain import BaseAggregate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import domain
from domain import api_key, forecast, money
from domain.api_key import ApiKey
from domain.forecast import Forecast
from domain.receipt import CommandReceipt
from domain.scenario import Scenario
from domain.tenant import Tenant
from infra.eventstore import EventLog
from tests.domain.test_scenario_state_machine import (
    actors,
    assumptions_of,
    baselines,
    elapsed,
    moments,
    names,
    scenario_types,
    values_of,
)

IdSource = Callable[[], UUID]
# Builds, from drawn values and ids taken from the source, an aggregate whose last pending
# event is of the class the maker is registered for.
Maker = Callable[[st.DrawFn, IdSource], BaseAggregate[UUID]]

store_settings = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

horizons = values_of(mi.type_info(forecast.HorizonMonths), "horizon_months")
paths = values_of(mi.type_info(forecast.Paths), "paths")
# As commands.context accepts them: 1-255 printable ASCII characters.
idempotency_keys = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255
)
# A forecast result's amounts: finite floats rounded to cents, as the forecaster stores
# them (whole cents divided by 100, so never -0.0 or NaN, which would not compare equal).
_LARGEST_CENTS = int((money.MONEY_LIMIT - money.CENT) / money.CENT)
result_amounts = st.integers(min_value=-_LARGEST_CENTS, max_value=_LARGEST_CENTS).map(
    lambda cents: cents / 100
)
first_months = st.tuples(
    st.integers(min_value=2000, max_value=2100), st.integers(min_value=1, max_value=12)
)
# Seconds a worker spent: any finite non-negative float (JSON keeps every one exactly).
compute_times = st.floats(min_value=0.0, max_value=86_400.0, allow_nan=False)


def later(draw: st.DrawFn, aggregate: BaseAggregate[UUID]) -> datetime:
    return aggregate.modified_on + draw(elapsed)


def registered_tenant(draw: st.DrawFn, new_id: IdSource) -> Tenant:
    return Tenant.register(draw(actors(new_id())), draw(names), at=draw(moments))


def issued_key(draw: st.DrawFn, new_id: IdSource) -> ApiKey:
    # The key id derives from the hash, so the secret comes from the id source too.
    key_hash = api_key.hash_key(str(new_id()))
    role = draw(st.sampled_from(api_key.ROLES))
    return ApiKey.issue(draw(actors(new_id())), key_hash, role, at=draw(moments))


def revoked_key(draw: st.DrawFn, new_id: IdSource) -> ApiKey:
    key = issued_key(draw, new_id)
    key.revoke(draw(actors(key.tenant_id)), at=later(draw, key))
    return key


def created_scenario(draw: st.DrawFn, new_id: IdSource) -> Scenario:
    return Scenario.create(
        draw(actors(new_id())),
        scenario_id=new_id(),
        name=draw(names),
        baseline=draw(baselines),
        assumptions=draw(assumptions_of(draw(scenario_types))),
        at=draw(moments),
    )


def changed_scenario(draw: st.DrawFn, new_id: IdSource) -> Scenario:
    """A created scenario after a few updates of any of its parts."""
    scenario = created_scenario(draw, new_id)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        scenario.update(
            draw(actors(scenario.tenant_id)),
            name=draw(st.none() | names),
            baseline=draw(st.none() | baselines),
            assumptions=draw(st.none() | assumptions_of(scenario.type)),
            at=later(draw, scenario),
        )
    return scenario


def renamed_scenario(draw: st.DrawFn, new_id: IdSource) -> Scenario:
    scenario = changed_scenario(draw, new_id)
    name = draw(names.filter(lambda name: name != scenario.name))
    scenario.update(draw(actors(scenario.tenant_id)), name=name, at=later(draw, scenario))
    return scenario


def rebased_scenario(draw: st.DrawFn, new_id: IdSource) -> Scenario:
    scenario = changed_scenario(draw, new_id)
    baseline = draw(baselines.filter(lambda baseline: baseline != scenario.baseline))
    actor = draw(actors(scenario.tenant_id))
    scenario.update(actor, baseline=baseline, at=later(draw, scenario))
    return scenario


def reassumed_scenario(draw: st.DrawFn, new_id: IdSource) -> Scenario:
    scenario = changed_scenario(draw, new_id)
    assumptions = draw(
        assumptions_of(scenario.type).filter(lambda changed: changed != scenario.assumptions)
    )
    actor = draw(actors(scenario.tenant_id))
    scenario.update(actor, assumptions=assumptions, at=later(draw, scenario))
    return scenario


def archived_scenario(draw: st.DrawFn, new_id: IdSource) -> Scenario:
    scenario = changed_scenario(draw, new_id)
    scenario.archive(draw(actors(scenario.tenant_id)), at=later(draw, scenario))
    return scenario


def requested_forecast(draw: st.DrawFn, new_id: IdSource) -> Forecast:
    scenario = changed_scenario(draw, new_id)
    return Forecast.request(
        draw(actors(scenario.tenant_id)),
        forecast_id=new_id(),
        scenario=scenario,
        horizon_months=draw(horizons),
        paths=draw(paths),
        at=later(draw, scenario),
    )


def started_forecast(draw: st.DrawFn, new_id: IdSource) -> Forecast:
    """A requested forecast taken by a worker once, or again after a worker crashed."""
    requested = requested_forecast(draw, new_id)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        requested.start(draw(actors(requested.tenant_id)), at=later(draw, requested))
    return requested


def month_names(draw: st.DrawFn, count: int) -> list[str]:
    """`count` consecutive months as "YYYY-MM", from a drawn first month."""
    year, month = draw(first_months)
    return [
        f"{year + (month - 1 + step) // 12:04d}-{(month - 1 + step) % 12 + 1:02d}"
        for step in range(count)
    ]


def forecast_result(draw: st.DrawFn, started: Forecast) -> dict[str, Any]:
    """A result document shaped as API.md's: one amount per month of the horizon in every
    series and band, a runway month among them (or none), a probability over the paths."""
    months = month_names(draw, started.horizon_months)

    def series() -> list[float]:
        return draw(st.lists(result_amounts, min_size=len(months), max_size=len(months)))

    def percentiles() -> dict[str, list[float]]:
        return {"p10": series(), "p50": series(), "p90": series()}

    negative_paths = draw(st.integers(min_value=0, max_value=started.paths))
    return {
        "months": months,
        "revenue": series(),
        "costs": series(),
        "net": series(),
        "cash": series(),
        "bands": {"revenue": percentiles(), "cash": percentiles()},
        "runwayMonth": draw(st.none() | st.sampled_from(months)),
        "probabilityCashNegative": negative_paths / started.paths,
        "paths": started.paths,
    }


def completed_forecast(draw: st.DrawFn, new_id: IdSource) -> Forecast:
    started = started_forecast(draw, new_id)
    started.complete(
        draw(actors(started.tenant_id)),
        result=forecast_result(draw, started),
        compute_seconds=draw(compute_times),
        at=later(draw, started),
    )
    return started


def failed_forecast(draw: st.DrawFn, new_id: IdSource) -> Forecast:
    """A forecast that failed while queued (timed out waiting) or while running."""
    unfinished = draw(st.sampled_from([requested_forecast, started_forecast]))(draw, new_id)
    unfinished.fail(
        draw(actors(unfinished.tenant_id)),
        reason=draw(st.sampled_from([forecast.TIMEOUT, forecast.ERROR])),
        message=draw(st.text(max_size=200)),
        at=later(draw, unfinished),
    )
    return unfinished


def recorded_receipt(draw: st.DrawFn, new_id: IdSource) -> CommandReceipt:
    return CommandReceipt.record(
        draw(actors(new_id())),
        idempotency_key=draw(idempotency_keys),
        route=draw(st.text(max_size=80)),
        fingerprint=draw(st.binary(min_size=32, max_size=32)).hex(),
        status=draw(st.integers(min_value=100, max_value=599)),
        body=draw(st.text()),
        headers=draw(st.dictionaries(st.text(max_size=30), st.text(max_size=80), max_size=5)),
        at=draw(moments),
    )


MAKERS: dict[type[object], Maker] = {
    Tenant.Registered: registered_tenant,
    ApiKey.Issued: issued_key,
    ApiKey.Revoked: revoked_key,
    Scenario.Created: created_scenario,
    Scenario.Renamed: renamed_scenario,
    Scenario.BaselineChanged: rebased_scenario,
    Scenario.AssumptionsChanged: reassumed_scenario,
    Scenario.Archived: archived_scenario,
    Forecast.Requested: requested_forecast,
    Forecast.Started: started_forecast,
    Forecast.Completed: completed_forecast,
    Forecast.Failed: failed_forecast,
    CommandReceipt.Recorded: recorded_receipt,
}
EVENT_CLASSES = list(MAKERS)
EVENT_NAMES = [event_class.__qualname__ for event_class in EVENT_CLASSES]


@st.composite
def aggregates_ending_in(
    draw: st.DrawFn, event_class: type[object], new_id: IdSource | None = None
) -> BaseAggregate[UUID]:
    """An aggregate with its pending events, the last one of `event_class`. Ids are drawn
    unless an id source is given (a store needs ids that no earlier example used)."""
    ids: IdSource = new_id if new_id is not None else lambda: draw(st.uuids())
    aggregate = MAKERS[event_class](draw, ids)
    assert type(aggregate.pending_events[-1]) is event_class
    return aggregate


def domain_aggregates() -> set[type[BaseAggregate[UUID]]]:
    """Every aggregate class defined in a module of the domain package."""
    found: set[type[BaseAggregate[UUID]]] = set()
    for module_info in pkgutil.iter_modules(domain.__path__):
        module = importlib.import_module(f"{domain.__name__}.{module_info.name}")
        found |= {
            candidate
            for candidate in vars(module).values()
            if isinstance(candidate, type)
            and issubclass(candidate, BaseAggregate)
            and candidate.__module__ == module.__name__
        }
    return found


def declared_events() -> dict[str, type[object]]:
    """Every event class nested in an aggregate, by the topic pinned on it."""
    return {
        topic: nested
        for aggregate in domain_aggregates()
        for nested in vars(aggregate).values()
        if isinstance(nested, type) and (topic := getattr(nested, "TOPIC", None))
    }


def test_every_event_class_of_every_aggregate_is_covered() -> None:
    assert {Tenant, ApiKey, Scenario, Forecast, CommandReceipt} <= domain_aggregates()
    declared = set(declared_events().values())

    assert declared - set(MAKERS) == set(), "add a maker to MAKERS for each new event class"
    assert set(MAKERS) - declared == set()


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=EVENT_NAMES)
@store_settings
@given(data=st.data())
def test_every_event_survives_the_store_mapper_unchanged(
    event_log: EventLog, event_class: type[object], data: st.DataObject
) -> None:
    aggregate = data.draw(aggregates_ending_in(event_class))

    for event in aggregate.collect_events():
        stored = event_log.mapper.to_stored_event(event)
        decoded = event_log.mapper.to_domain_event(stored)

        assert type(decoded) is type(event)
        assert decoded == event
        # Equality forgives 1 == 1.0 and a changed time zone; the stored form does not.
        assert event_log.mapper.to_stored_event(decoded) == stored


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=EVENT_NAMES)
@store_settings
@given(data=st.data())
def test_saved_aggregate_is_loaded_back_equal(
    event_log: EventLog, event_class: type[object], data: st.DataObject
) -> None:
    aggregate = data.draw(aggregates_ending_in(event_class, new_id=uuid.uuid4))

    event_log.save(aggregate)
    loaded: BaseAggregate[UUID] = event_log.repository.get(aggregate.id)

    assert type(loaded) is type(aggregate)
    assert loaded == aggregate
    assert len(list(event_log.repository.event_store.get(aggregate.id))) == aggregate.version
