"""What a scenario models: the baseline and the assumptions of each scenario type.

Shapes and ranges are on the types (msgspec validates them); the effects of each type on
the forecast are in the forecast model.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Final, Literal

import msgspec

from domain import money

ScenarioType = Literal["REVENUE_INCREASE", "COST_REDUCTION", "HIRING", "PRICE_CHANGE", "CUSTOM"]
SCENARIO_TYPES: Final = ("REVENUE_INCREASE", "COST_REDUCTION", "HIRING", "PRICE_CHANGE", "CUSTOM")

Month = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")]
GrowthRate = Annotated[float, msgspec.Meta(ge=-0.5, le=1.0)]
Volatility = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
Percent = Annotated[float, msgspec.Meta(ge=-100.0, le=1000.0)]
Share = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
OffsetMonths = Annotated[int, msgspec.Meta(ge=0, le=119)]
Headcount = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class Baseline(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    start_month: Month
    opening_cash: money.MoneyField
    monthly_revenue: money.MoneyField
    monthly_costs: money.MoneyField
    revenue_growth_rate: GrowthRate = 0.0
    cost_growth_rate: GrowthRate = 0.0
    revenue_volatility: Volatility = 0.05

    def __post_init__(self) -> None:
        money.normalise_money_fields(self, "opening_cash", "monthly_revenue", "monthly_costs")
        if self.monthly_revenue < 0:
            raise ValueError("`monthlyRevenue` must not be negative")
        if self.monthly_costs < 0:
            raise ValueError("`monthlyCosts` must not be negative")


class _Assumptions(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    rename="camel",
    forbid_unknown_fields=True,
    tag_field="type",
):
    start_offset_months: OffsetMonths = 0


class RevenueIncrease(_Assumptions, tag="REVENUE_INCREASE", frozen=True):
    percent: Percent


class CostReduction(_Assumptions, tag="COST_REDUCTION", frozen=True):
    percent: Share


class Hiring(_Assumptions, tag="HIRING", frozen=True):
    headcount: Headcount
    monthly_cost_per_head: money.MoneyField

    def __post_init__(self) -> None:
        money.normalise_money_fields(self, "monthly_cost_per_head")
        if self.monthly_cost_per_head < 0:
            raise ValueError("`monthlyCostPerHead` must not be negative")


class PriceChange(_Assumptions, tag="PRICE_CHANGE", frozen=True):
    percent: Percent
    churn_percent: Share = 0.0


class Custom(_Assumptions, tag="CUSTOM", frozen=True):
    revenue_percent: Percent = 0.0
    cost_percent: Percent = 0.0
    one_off_cash: money.MoneyField = Decimal("0.00")

    def __post_init__(self) -> None:
        money.normalise_money_fields(self, "one_off_cash")


Assumptions = RevenueIncrease | CostReduction | Hiring | PriceChange | Custom

ASSUMPTIONS_BY_TYPE: Final[dict[str, type[Assumptions]]] = {
    "REVENUE_INCREASE": RevenueIncrease,
    "COST_REDUCTION": CostReduction,
    "HIRING": Hiring,
    "PRICE_CHANGE": PriceChange,
    "CUSTOM": Custom,
}


def scenario_type(assumptions: Assumptions) -> ScenarioType:
    tag: ScenarioType = assumptions.__struct_config__.tag  # type: ignore[assignment]
    return tag


def baseline_payload(baseline: Baseline) -> dict[str, Any]:
    """The baseline as stored in events: JSON values only, money as exact strings."""
    payload: dict[str, Any] = msgspec.to_builtins(baseline)
    return payload


def assumptions_payload(assumptions: Assumptions) -> dict[str, Any]:
    """The assumptions as stored in events, tagged with their scenario type."""
    payload: dict[str, Any] = msgspec.to_builtins(assumptions)
    return payload


def baseline_from_payload(payload: dict[str, Any]) -> Baseline:
    return msgspec.convert(payload, Baseline, dec_hook=money.decode_hook)


def assumptions_from_payload(payload: dict[str, Any]) -> Assumptions:
    assumptions: Assumptions = msgspec.convert(payload, Assumptions, dec_hook=money.decode_hook)
    return assumptions
