"""What command responses carry: the resource as it is after the command."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from domain import scenario_spec as spec
from domain.scenario import Scenario

_encoder = msgspec.json.Encoder()


class ScenarioView(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    id: UUID
    name: str
    type: str
    status: str
    version: int
    baseline: spec.Baseline
    assumptions: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class ForecastAccepted(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    forecast_id: UUID
    status: str


def scenario_view(scenario: Scenario) -> ScenarioView:
    assumptions = spec.assumptions_payload(scenario.assumptions)
    del assumptions["type"]
    return ScenarioView(
        id=scenario.id,
        name=scenario.name,
        type=scenario.type,
        status=scenario.status,
        version=scenario.version,
        baseline=scenario.baseline,
        assumptions=assumptions,
        created_at=scenario.created_on,
        updated_at=scenario.modified_on,
    )


def encode(view: msgspec.Struct) -> bytes:
    return _encoder.encode(view)
