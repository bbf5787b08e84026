"""The scenario as a state machine: whatever sequence of commands it is given, replaying the
events it recorded rebuilds it exactly. The value strategies are derived from the msgspec
types of the scenario spec, so a new field or bound is generated without editing this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
import msgspec.inspect as mi
import pytest
from eventsourcing.domain import CanMutateAggregate
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from domain import money
from domain import scenario_spec as spec
from domain.errors import ScenarioArchivedError, ScenarioTypeChangeError
from domain.events import OPERATOR, Actor
from domain.scenario import ACTIVE, ARCHIVED, Scenario

# Money fields whose sign is a business rule (__post_init__), not a bound on their type.
NON_NEGATIVE_MONEY = frozenset({"monthly_revenue", "monthly_costs", "monthly_cost_per_head"})
LARGEST_MONEY = money.MONEY_LIMIT - money.CENT

names = st.text(max_size=60)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
# A clock only moves forward; a step of zero is two commands in the same microsecond.
elapsed = st.integers(min_value=0, max_value=90 * 86_400).map(lambda s: timedelta(seconds=s))


def actors(tenant_id: UUID) -> st.SearchStrategy[Actor]:
    """The callers of one tenant: its keys, or the operator."""
    return st.builds(
        Actor,
        tenant_id=st.just(tenant_id),
        actor_id=st.uuids().map(str) | st.just(OPERATOR),
        request_id=st.text(max_size=40),
    )


def money_amounts(*, non_negative: bool = False) -> st.SearchStrategy[Decimal]:
    """Amounts the domain accepts: at most two places (whole amounts included, which the
    domain normalises to two places) and below the money limit."""
    low = Decimal(0) if non_negative else -LARGEST_MONEY
    cents = st.decimals(min_value=low, max_value=LARGEST_MONEY, places=2)
    whole = st.integers(min_value=int(low), max_value=int(LARGEST_MONEY)).map(Decimal)
    return cents | whole


def values_of(kind: mi.Type, field: str) -> st.SearchStrategy[Any]:
    """Valid values of one msgspec type, within the bounds its Meta declares."""
    if isinstance(kind, mi.FloatType):
        return st.floats(
            min_value=kind.ge if kind.gt is None else kind.gt,
            max_value=kind.le if kind.lt is None else kind.lt,
            exclude_min=kind.gt is not None,
            exclude_max=kind.lt is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    if isinstance(kind, mi.IntType):
        return st.integers(
            min_value=kind.ge if kind.gt is None else kind.gt + 1,
            max_value=kind.le if kind.lt is None else kind.lt - 1,
        )
    if isinstance(kind, mi.StrType) and kind.pattern is not None:
        return st.from_regex(kind.pattern, fullmatch=True)
    # Money: domain.money.MoneyField, the custom type Money with its own schema.
    if (
        isinstance(kind, mi.Metadata)
        and isinstance(kind.type, mi.CustomType)
        and kind.type.cls is money.Money
    ):
        return money_amounts(non_negative=field in NON_NEGATIVE_MONEY)
    # A new kind of field must get a strategy here rather than go untested.
    raise TypeError(f"no strategy for field {field!r} of type {kind!r}")


def structs(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Instances of a spec struct; optional fields are sometimes left to their default."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    required = {f.name: values_of(f.type, f.name) for f in info.fields if f.required}
    optional = {f.name: values_of(f.type, f.name) for f in info.fields if not f.required}
    return st.fixed_dictionaries(required, optional=optional).map(lambda kwargs: cls(**kwargs))


# Built once: building a strategy (and validating it on first draw) costs more than drawing.
baselines: st.SearchStrategy[spec.Baseline] = structs(spec.Baseline)
_ASSUMPTIONS = {name: structs(cls) for name, cls in spec.ASSUMPTIONS_BY_TYPE.items()}


def assumptions_of(scenario_type: str) -> st.SearchStrategy[spec.Assumptions]:
    return _ASSUMPTIONS[scenario_type]


scenario_types = st.sampled_from(spec.SCENARIO_TYPES)


def replay(events: list[CanMutateAggregate[UUID]]) -> Scenario:
    aggregate: Scenario | None = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Scenario)
    return aggregate


def state_of(scenario: Scenario) -> dict[str, object]:
    return {
        "id": scenario.id,
        "version": scenario.version,
        "name": scenario.name,
        "baseline": scenario.baseline,
        "assumptions": scenario.assumptions,
        "status": scenario.status,
        "tenant_id": scenario.tenant_id,
        "created_on": scenario.created_on,
        "modified_on": scenario.modified_on,
    }


class ScenarioLifecycle(RuleBasedStateMachine):
    """One scenario driven through its commands; `events` is everything it recorded."""

    scenario: Scenario
    actors: st.SearchStrategy[Actor]

    def __init__(self) -> None:
        super().__init__()
        self.events: list[CanMutateAggregate[UUID]] = []
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def tick(self, step: timedelta) -> datetime:
        self.now += step
        return self.now

    def record(self, expected: int) -> None:
        """Collects what the last command recorded, which must be `expected` events."""
        recorded = self.scenario.collect_events()
        assert len(recorded) == expected
        self.events.extend(recorded)

    def other_type(self, data: st.DataObject) -> str:
        others = [t for t in spec.SCENARIO_TYPES if t != self.scenario.type]
        return data.draw(st.sampled_from(others))

    @contextmanager
    def refused_once_archived(self) -> Iterator[None]:
        """Runs a change; once the scenario is archived, the change must be refused with
        nothing recorded and nothing changed."""
        if self.scenario.status == ACTIVE:
            yield
            return
        before = state_of(self.scenario)
        with pytest.raises(ScenarioArchivedError):
            yield
        self.record(0)
        assert state_of(self.scenario) == before

    @initialize(
        scenario_id=st.uuids(),
        tenant_id=st.uuids(),
        name=names,
        scenario_type=scenario_types,
        at=moments,
        data=st.data(),
    )
    def create(
        self,
        scenario_id: UUID,
        tenant_id: UUID,
        name: str,
        scenario_type: str,
        at: datetime,
        data: st.DataObject,
    ) -> None:
        self.actors = actors(tenant_id)
        self.now = at
        self.scenario = Scenario.create(
            data.draw(self.actors),
            scenario_id=scenario_id,
            name=name,
            baseline=data.draw(baselines),
            assumptions=data.draw(assumptions_of(scenario_type)),
            at=at,
        )
        self.record(1)
        assert self.scenario.type == scenario_type
        assert self.scenario.status == ACTIVE

    @rule(name=names, step=elapsed, data=st.data())
    def rename(self, name: str, step: timedelta, data: st.DataObject) -> None:
        changes = name != self.scenario.name
        actor = data.draw(self.actors)
        with self.refused_once_archived():
            self.scenario.update(actor, name=name, at=self.tick(step))
            self.record(int(changes))
            assert self.scenario.name == name

    @rule(baseline=baselines, step=elapsed, data=st.data())
    def change_baseline(
        self, baseline: spec.Baseline, step: timedelta, data: st.DataObject
    ) -> None:
        changes = baseline != self.scenario.baseline
        actor = data.draw(self.actors)
        with self.refused_once_archived():
            self.scenario.update(actor, baseline=baseline, at=self.tick(step))
            self.record(int(changes))
            assert self.scenario.baseline == baseline

    @rule(step=elapsed, data=st.data())
    def change_assumptions(self, step: timedelta, data: st.DataObject) -> None:
        assumptions = data.draw(assumptions_of(self.scenario.type))
        changes = assumptions != self.scenario.assumptions
        actor = data.draw(self.actors)
        with self.refused_once_archived():
            self.scenario.update(actor, assumptions=assumptions, at=self.tick(step))
            self.record(int(changes))
            assert self.scenario.assumptions == assumptions

    @rule(step=elapsed, data=st.data())
    def update_several_parts(self, step: timedelta, data: st.DataObject) -> None:
        """Each part is left out, given as it is, or changed: only changes are recorded."""
        current = self.scenario
        name = data.draw(st.none() | st.just(current.name) | names)
        baseline = data.draw(st.none() | st.just(current.baseline) | baselines)
        assumptions = data.draw(
            st.none() | st.just(current.assumptions) | assumptions_of(current.type)
        )
        changes = (
            (name is not None and name != current.name)
            + (baseline is not None and baseline != current.baseline)
            + (assumptions is not None and assumptions != current.assumptions)
        )
        actor = data.draw(self.actors)
        with self.refused_once_archived():
            current.update(
                actor, name=name, baseline=baseline, assumptions=assumptions, at=self.tick(step)
            )
            self.record(changes)

    @rule(step=elapsed, data=st.data())
    def change_of_type_is_refused(self, step: timedelta, data: st.DataObject) -> None:
        assumptions = data.draw(assumptions_of(self.other_type(data)))
        actor = data.draw(self.actors)
        before = state_of(self.scenario)
        with (
            self.refused_once_archived(),
            pytest.raises(ScenarioTypeChangeError, match="keep its type"),
        ):
            self.scenario.update(actor, assumptions=assumptions, at=self.tick(step))
        self.record(0)
        assert state_of(self.scenario) == before

    @rule(step=elapsed, data=st.data())
    def archive(self, step: timedelta, data: st.DataObject) -> None:
        actor = data.draw(self.actors)
        with self.refused_once_archived():
            self.scenario.archive(actor, at=self.tick(step))
            self.record(1)
            assert self.scenario.status == ARCHIVED

    @invariant()
    def replaying_the_events_rebuilds_the_scenario(self) -> None:
        replayed = replay(self.events)
        assert state_of(replayed) == state_of(self.scenario)
        assert replayed == self.scenario

    @invariant()
    def version_counts_the_events(self) -> None:
        assert self.scenario.version == len(self.events)
        assert [e.originator_version for e in self.events] == list(range(1, len(self.events) + 1))
        assert all(e.originator_id == self.scenario.id for e in self.events)


ScenarioLifecycle.TestCase.settings = settings(
    max_examples=50, stateful_step_count=20, deadline=None, derandomize=True
)
TestReplayingEventsRebuildsTheScenario = ScenarioLifecycle.TestCase


def test_an_actor_of_another_tenant_cannot_change_a_scenario() -> None:
    from datetime import UTC, datetime
    from decimal import Decimal
    from uuid import uuid4

    from domain.errors import ForeignTenantError
    from domain.forecast import Forecast
    from domain.scenario import Scenario
    from domain.scenario_spec import Baseline, CostReduction

    at = datetime.now(UTC)
    owner = Actor(tenant_id=uuid4(), actor_id="k1", request_id="r1")
    intruder = Actor(tenant_id=uuid4(), actor_id="k2", request_id="r2")
    baseline = Baseline(
        start_month="2026-01",
        opening_cash=Decimal("1.00"),
        monthly_revenue=Decimal("1.00"),
        monthly_costs=Decimal("1.00"),
    )
    scenario = Scenario.create(
        owner,
        scenario_id=uuid4(),
        name="mine",
        baseline=baseline,
        assumptions=CostReduction(percent=5.0),
        at=at,
    )
    scenario.collect_events()

    with pytest.raises(ForeignTenantError):
        scenario.update(intruder, name="theirs", at=at)
    with pytest.raises(ForeignTenantError):
        scenario.archive(intruder, at=at)
    with pytest.raises(ForeignTenantError):
        Forecast.request(
            intruder, forecast_id=uuid4(), scenario=scenario, horizon_months=12, paths=10, at=at
        )
    assert scenario.collect_events() == []
    assert scenario.name == "mine"
