"""Command messages: the request bodies as clients send them, and the validated commands
whose canonical encoding is the idempotency fingerprint."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import msgspec

from domain import forecast
from domain import scenario_spec as spec
from infra import apidoc

# Some visible text, and no control characters (PostgreSQL text cannot even hold NUL).
Name = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^(?=.*\S)[^\x00-\x1f\x7f]+$")
]
# Validated against the scenario's type once that type is known.
RawAssumptions = Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema=apidoc.assumptions_schema())]


class _Body(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


class CreateScenarioBody(_Body, frozen=True):
    name: Name
    type: spec.ScenarioType
    baseline: spec.Baseline
    assumptions: RawAssumptions


class UpdateScenarioBody(_Body, frozen=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    baseline: spec.Baseline | msgspec.UnsetType = msgspec.UNSET
    assumptions: RawAssumptions | msgspec.UnsetType = msgspec.UNSET


class ArchiveScenarioBody(_Body, frozen=True):
    pass


class GenerateForecastBody(_Body, frozen=True):
    scenario_id: UUID
    horizon_months: forecast.HorizonMonths
    paths: forecast.Paths = forecast.DEFAULT_PATHS


class CreateScenario(_Body, frozen=True):
    name: str
    baseline: spec.Baseline
    assumptions: spec.Assumptions


class UpdateScenario(_Body, frozen=True):
    scenario_id: UUID
    name: str | msgspec.UnsetType = msgspec.UNSET
    baseline: spec.Baseline | msgspec.UnsetType = msgspec.UNSET
    assumptions: spec.Assumptions | msgspec.UnsetType = msgspec.UNSET


class ArchiveScenario(_Body, frozen=True):
    scenario_id: UUID


class RequestForecast(_Body, frozen=True):
    scenario_id: UUID
    horizon_months: int
    paths: int
