"""The forecast model against DESIGN.md: expected paths worked out by hand (and checked in
Decimal), properties of the Monte Carlo bands, and the bands against a dense NumPy
re-implementation that follows the formulas literally."""

from __future__ import annotations

import math
import uuid
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from domain import forecast_model as fm
from domain import scenario_spec as spec
from tests.domain.test_scenario_state_machine import assumptions_of, baselines, scenario_types

PROPERTIES = settings(max_examples=40, deadline=None, derandomize=True)
SEED = uuid.UUID("0b6f3c2e-5d1a-4e8b-9c47-2f1e6a9d8b31")


def baseline(**fields: Any) -> spec.Baseline:
    values: dict[str, Any] = {"start_month": "2026-01", "revenue_volatility": 0.0, **fields}
    for name in ("opening_cash", "monthly_revenue", "monthly_costs"):
        values[name] = Decimal(values[name])
    return spec.Baseline(**values)


# --- expected paths worked out by hand ------------------------------------------------------

# (baseline, assumptions, horizon) -> the expected path to the cent, as written out by hand.
HAND_CASES: dict[str, tuple[spec.Baseline, spec.Assumptions, dict[str, list[str]]]] = {
    # +10 % revenue from month 2; both growth rates compound as (1 + g)^(m - 1); the months
    # roll over the year.
    "revenue_increase": (
        baseline(
            start_month="2026-11",
            opening_cash="2500.00",
            monthly_revenue="10000.00",
            monthly_costs="12000.00",
            revenue_growth_rate=0.02,
            cost_growth_rate=0.01,
        ),
        spec.RevenueIncrease(percent=10, start_offset_months=1),
        {
            "months": ["2026-11", "2026-12", "2027-01", "2027-02"],
            # 10000 * 1.02^(m-1) * 1.1 from month 2
            "revenue": ["10000.00", "11220.00", "11444.40", "11673.29"],
            # 12000 * 1.01^(m-1)
            "costs": ["12000.00", "12120.00", "12241.20", "12363.61"],
            "net": ["-2000.00", "-900.00", "-796.80", "-690.32"],
            "cash": ["500.00", "-400.00", "-1196.80", "-1887.12"],
        },
    ),
    # Costs times 0.8 from month 3 (offset 2).
    "cost_reduction": (
        baseline(
            opening_cash="5000.00",
            monthly_revenue="8000.00",
            monthly_costs="9000.00",
            cost_growth_rate=0.03,
        ),
        spec.CostReduction(percent=20, start_offset_months=2),
        {
            "months": ["2026-01", "2026-02", "2026-03", "2026-04"],
            "revenue": ["8000.00", "8000.00", "8000.00", "8000.00"],
            # 9000 * 1.03^(m-1), times 0.8 from month 3
            "costs": ["9000.00", "9270.00", "7638.48", "7867.63"],
            "net": ["-1000.00", "-1270.00", "361.52", "132.37"],
            "cash": ["4000.00", "2730.00", "3091.52", "3223.89"],
        },
    ),
    # 2 x 3500.50 added from month 2 and never grown, while the baseline costs grow 5 %.
    "hiring": (
        baseline(
            opening_cash="30000.00",
            monthly_revenue="20000.00",
            monthly_costs="10000.00",
            revenue_growth_rate=0.01,
            cost_growth_rate=0.05,
        ),
        spec.Hiring(headcount=2, monthly_cost_per_head=Decimal("3500.50"), start_offset_months=1),
        {
            "months": ["2026-01", "2026-02", "2026-03", "2026-04"],
            "revenue": ["20000.00", "20200.00", "20402.00", "20606.02"],
            # 10000 * 1.05^(m-1) + 7001.00 from month 2
            "costs": ["10000.00", "17501.00", "18026.00", "18577.25"],
            "net": ["10000.00", "2699.00", "2376.00", "2028.77"],
            "cash": ["40000.00", "42699.00", "45075.00", "47103.77"],
        },
    ),
    # Price +20 % with 10 % churn: revenue times 1.2 * 0.9 = 1.08 from month 1.
    "price_change": (
        baseline(
            opening_cash="1000.00",
            monthly_revenue="5000.00",
            monthly_costs="5600.00",
            revenue_growth_rate=0.01,
        ),
        spec.PriceChange(percent=20, churn_percent=10),
        {
            "months": ["2026-01", "2026-02", "2026-03", "2026-04"],
            # 5000 * 1.01^(m-1) * 1.08
            "revenue": ["5400.00", "5454.00", "5508.54", "5563.63"],
            "costs": ["5600.00", "5600.00", "5600.00", "5600.00"],
            "net": ["-200.00", "-146.00", "-91.46", "-36.37"],
            "cash": ["800.00", "654.00", "562.54", "526.17"],
        },
    ),
    # Revenue +5 %, costs -10 % from month 3, and -2500.00 once, in month 3.
    "custom": (
        baseline(
            opening_cash="4000.00",
            monthly_revenue="6000.00",
            monthly_costs="7000.00",
            revenue_growth_rate=0.03,
            cost_growth_rate=0.02,
        ),
        spec.Custom(
            revenue_percent=5,
            cost_percent=-10,
            one_off_cash=Decimal("-2500.00"),
            start_offset_months=2,
        ),
        {
            "months": ["2026-01", "2026-02", "2026-03", "2026-04"],
            # 6000 * 1.03^(m-1), times 1.05 from month 3
            "revenue": ["6000.00", "6180.00", "6683.67", "6884.18"],
            # 7000 * 1.02^(m-1), times 0.9 from month 3
            "costs": ["7000.00", "7140.00", "6554.52", "6685.61"],
            "net": ["-1000.00", "-960.00", "129.15", "198.57"],
            # 2040.00 + 129.15 - 2500.00 in month 3
            "cash": ["3000.00", "2040.00", "-330.85", "-132.28"],
        },
    ),
}
HAND_RUNWAYS = {
    "revenue_increase": "2026-12",
    "cost_reduction": None,
    "hiring": None,
    "price_change": None,
    "custom": "2026-03",
}


def decimal_path(
    base: spec.Baseline, assumptions: spec.Assumptions, horizon: int
) -> dict[str, list[str]]:
    """DESIGN.md's formulas in exact decimal arithmetic, rounded to the cent at the end."""

    def dec(value: float) -> Decimal:
        return Decimal(str(value))

    hundred = Decimal(100)
    revenue_factor = cost_factor = Decimal(1)
    added = one_off = Decimal(0)
    match assumptions:
        case spec.RevenueIncrease(percent=percent):
            revenue_factor = 1 + dec(percent) / hundred
        case spec.CostReduction(percent=percent):
            cost_factor = 1 - dec(percent) / hundred
        case spec.Hiring(headcount=headcount, monthly_cost_per_head=per_head):
            added = headcount * per_head
        case spec.PriceChange(percent=percent, churn_percent=churn):
            revenue_factor = (1 + dec(percent) / hundred) * (1 - dec(churn) / hundred)
        case spec.Custom():
            revenue_factor = 1 + dec(assumptions.revenue_percent) / hundred
            cost_factor = 1 + dec(assumptions.cost_percent) / hundred
            one_off = assumptions.one_off_cash
    offset = assumptions.start_offset_months
    cash = base.opening_cash
    rows: dict[str, list[Decimal]] = {"revenue": [], "costs": [], "net": [], "cash": []}
    for m in range(1, horizon + 1):
        on = m > offset
        revenue = (
            base.monthly_revenue
            * (1 + dec(base.revenue_growth_rate)) ** (m - 1)
            * (revenue_factor if on else 1)
        )
        costs = base.monthly_costs * (1 + dec(base.cost_growth_rate)) ** (m - 1) * (
            cost_factor if on else 1
        ) + (added if on else 0)
        cash = cash + (revenue - costs) + (one_off if m == offset + 1 else 0)
        for name, value in (("revenue", revenue), ("costs", costs), ("net", revenue - costs)):
            rows[name].append(value)
        rows["cash"].append(cash)
    cent = Decimal("0.01")
    return {k: [str(v.quantize(cent, ROUND_HALF_EVEN)) for v in vs] for k, vs in rows.items()}


def as_cents(values: list[float]) -> list[str]:
    return [f"{value:.2f}" for value in values]


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_the_hand_worked_paths_follow_the_formulas_in_exact_decimals(case: str) -> None:
    base, assumptions, expected = HAND_CASES[case]
    computed = decimal_path(base, assumptions, len(expected["months"]))
    assert computed == {k: v for k, v in expected.items() if k != "months"}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_the_expected_path_of_each_scenario_type_matches_the_hand_worked_one(case: str) -> None:
    base, assumptions, expected = HAND_CASES[case]
    result = fm.run_forecast(base, assumptions, horizon_months=4, paths=50, seed=SEED)
    assert result.months == expected["months"]
    for name in ("revenue", "costs", "net", "cash"):
        assert as_cents(getattr(result, name)) == expected[name], name
    assert result.runway_month == HAND_RUNWAYS[case]


def test_a_custom_one_off_with_no_offset_lands_in_the_first_month() -> None:
    base = baseline(opening_cash="-100.00", monthly_revenue="1000.00", monthly_costs="1000.00")
    custom = spec.Custom(revenue_percent=5, cost_percent=5, one_off_cash=Decimal("150.25"))
    result = fm.run_forecast(base, custom, horizon_months=3, paths=10, seed=SEED)
    assert as_cents(result.revenue) == ["1050.00", "1050.00", "1050.00"]
    assert as_cents(result.costs) == ["1050.00", "1050.00", "1050.00"]
    assert as_cents(result.cash) == ["50.25", "50.25", "50.25"]
    # The opening cash was negative, but no month ends below zero.
    assert result.runway_month is None
    assert result.probability_cash_negative == 0.0


def test_effects_starting_after_the_horizon_change_nothing() -> None:
    base = baseline(opening_cash="100.00", monthly_revenue="1000.00", monthly_costs="900.00")
    late = spec.Custom(
        revenue_percent=50, cost_percent=-50, one_off_cash=Decimal("1e6"), start_offset_months=4
    )
    plain = fm.run_forecast(base, spec.Custom(), horizon_months=4, paths=10, seed=SEED)
    assert fm.run_forecast(base, late, horizon_months=4, paths=10, seed=SEED) == plain
    assert as_cents(plain.cash) == ["200.00", "300.00", "400.00", "500.00"]


def test_cash_that_reads_zero_is_not_a_runway() -> None:
    # 0.30 - 0.10 - 0.10 - 0.10 is -2.8e-17 in binary floating point.
    base = baseline(opening_cash="0.30", monthly_revenue="0", monthly_costs="0.10")
    result = fm.run_forecast(base, spec.Custom(), horizon_months=4, paths=10, seed=SEED)
    assert fm.expected_path(base, spec.Custom(), horizon_months=4).cash[2] < 0
    assert as_cents(result.cash) == ["0.20", "0.10", "0.00", "-0.10"]
    assert result.runway_month == "2026-04"
    three = fm.run_forecast(base, spec.Custom(), horizon_months=3, paths=10, seed=SEED)
    assert (three.runway_month, three.probability_cash_negative) == (None, 0.0)


def test_one_cent_below_zero_is_a_runway_on_every_path() -> None:
    base = baseline(opening_cash="0.29", monthly_revenue="0", monthly_costs="0.10")
    result = fm.run_forecast(base, spec.Custom(), horizon_months=3, paths=10, seed=SEED)
    assert as_cents(result.cash) == ["0.19", "0.09", "-0.01"]
    assert (result.runway_month, result.probability_cash_negative) == ("2026-03", 1.0)


def test_month_labels_roll_over_the_year() -> None:
    assert fm.month_labels("2026-11", 4) == ["2026-11", "2026-12", "2027-01", "2027-02"]
    assert fm.month_labels("1999-12", 1) == ["1999-12"]
    assert fm.month_labels("2026-01", 120)[-1] == "2035-12"


def test_inputs_outside_the_model_are_refused() -> None:
    base = baseline(opening_cash="1", monthly_revenue="1", monthly_costs="1")
    with pytest.raises(ValueError, match="horizon_months"):
        fm.run_forecast(base, spec.Custom(), horizon_months=0, paths=10, seed=SEED)
    with pytest.raises(ValueError, match="paths"):
        fm.run_forecast(base, spec.Custom(), horizon_months=1, paths=0, seed=SEED)
    with pytest.raises(ValueError, match="9999-12"):
        fm.month_labels("9999-11", 3)


def test_the_result_has_the_documented_shape() -> None:
    base, assumptions, _ = HAND_CASES["custom"]
    result = fm.run_forecast(base, assumptions, horizon_months=4, paths=20, seed=SEED)
    encoded = msgspec.json.encode(result)
    document = msgspec.json.decode(encoded)
    assert set(document) == {
        "months",
        "revenue",
        "costs",
        "net",
        "cash",
        "bands",
        "runwayMonth",
        "probabilityCashNegative",
        "paths",
    }
    assert set(document["bands"]) == {"revenue", "cash"}
    assert set(document["bands"]["cash"]) == {"p10", "p50", "p90"}
    # Decoding checks the documented constraints (month labels, a probability in 0..1).
    read = msgspec.json.decode(encoded, type=fm.ForecastResult)
    assert msgspec.json.encode(read) == encoded


# --- properties -------------------------------------------------------------------------------

# Start months that leave room for the longest horizon before 9999-12.
forecast_baselines = baselines.filter(lambda b: b.start_month < "9989")
scenarios = scenario_types.flatmap(assumptions_of)
horizons = st.integers(min_value=1, max_value=24)
path_counts = st.integers(min_value=1, max_value=200)


@PROPERTIES
@given(forecast_baselines, scenarios, horizons, path_counts, st.uuids())
def test_percentile_bands_are_ordered_and_every_array_spans_the_horizon(
    base: spec.Baseline,
    assumptions: spec.Assumptions,
    horizon: int,
    paths: int,
    seed: uuid.UUID,
) -> None:
    result = fm.run_forecast(base, assumptions, horizon_months=horizon, paths=paths, seed=seed)
    bands = (result.bands.revenue, result.bands.cash)
    arrays: list[list[Any]] = [result.months, result.revenue, result.costs, result.net, result.cash]
    arrays += [getattr(band, p) for band in bands for p in ("p10", "p50", "p90")]
    assert all(len(array) == horizon for array in arrays)
    for band in bands:
        for low, middle, high in zip(band.p10, band.p50, band.p90, strict=True):
            assert low <= middle <= high
    assert 0.0 <= result.probability_cash_negative <= 1.0
    assert result.paths == paths


@PROPERTIES
@given(forecast_baselines, scenarios, horizons, path_counts)
def test_zero_volatility_bands_are_the_expected_path(
    base: spec.Baseline, assumptions: spec.Assumptions, horizon: int, paths: int
) -> None:
    calm = msgspec.structs.replace(base, revenue_volatility=0.0)
    result = fm.run_forecast(calm, assumptions, horizon_months=horizon, paths=paths, seed=SEED)
    for band in (result.bands.revenue.p10, result.bands.revenue.p50, result.bands.revenue.p90):
        assert band == result.revenue
    for band in (result.bands.cash.p10, result.bands.cash.p50, result.bands.cash.p90):
        assert band == result.cash
    expected_share = 0.0 if result.runway_month is None else 1.0
    assert result.probability_cash_negative == expected_share


@PROPERTIES
@given(
    forecast_baselines,
    scenarios,
    horizons,
    st.integers(min_value=20, max_value=200),
    st.floats(min_value=0.05, max_value=2.0),
    st.uuids(),
    st.uuids(),
)
def test_the_same_seed_gives_the_same_result_and_another_seed_another(
    base: spec.Baseline,
    assumptions: spec.Assumptions,
    horizon: int,
    paths: int,
    volatility: float,
    seed: uuid.UUID,
    other: uuid.UUID,
) -> None:
    assume(seed != other)
    noisy = msgspec.structs.replace(base, revenue_volatility=volatility)
    expected = fm.expected_path(noisy, assumptions, horizon_months=horizon)
    assume(float(expected.revenue.max()) >= 100.0)

    def run(seed: uuid.UUID) -> bytes:
        result = fm.run_forecast(noisy, assumptions, horizon_months=horizon, paths=paths, seed=seed)
        return msgspec.json.encode(result)

    assert run(seed) == run(seed)
    assert run(seed) != run(other)


@PROPERTIES
@given(forecast_baselines, scenarios, horizons, path_counts, st.sampled_from([1, 2, 5, 24]))
def test_the_result_does_not_depend_on_the_block_size(
    base: spec.Baseline, assumptions: spec.Assumptions, horizon: int, paths: int, block: int
) -> None:
    def run(months_per_block: int | None) -> fm.ForecastResult:
        return fm.run_forecast(
            base,
            assumptions,
            horizon_months=horizon,
            paths=paths,
            seed=SEED,
            months_per_block=months_per_block,
        )

    assert run(block) == run(None)


def plain_cash_path(
    base: spec.Baseline, assumptions: spec.Assumptions, horizon: int
) -> list[float]:
    """Expected cash month by month in plain Python floats, straight from DESIGN.md."""
    revenue_factor = cost_factor = 1.0
    added = one_off = 0.0
    if isinstance(assumptions, spec.RevenueIncrease):
        revenue_factor = 1 + assumptions.percent / 100
    elif isinstance(assumptions, spec.CostReduction):
        cost_factor = 1 - assumptions.percent / 100
    elif isinstance(assumptions, spec.Hiring):
        added = float(assumptions.headcount * assumptions.monthly_cost_per_head)
    elif isinstance(assumptions, spec.PriceChange):
        revenue_factor = (1 + assumptions.percent / 100) * (1 - assumptions.churn_percent / 100)
    else:
        revenue_factor = 1 + assumptions.revenue_percent / 100
        cost_factor = 1 + assumptions.cost_percent / 100
        one_off = float(assumptions.one_off_cash)
    cash = float(base.opening_cash)
    path = []
    for m in range(1, horizon + 1):
        on = m > assumptions.start_offset_months
        revenue = (
            float(base.monthly_revenue)
            * (1 + base.revenue_growth_rate) ** (m - 1)
            * (revenue_factor if on else 1.0)
        )
        costs = float(base.monthly_costs) * (1 + base.cost_growth_rate) ** (m - 1) * (
            cost_factor if on else 1.0
        ) + (added if on else 0.0)
        cash = cash + (
            (revenue - costs) + (one_off if m == assumptions.start_offset_months + 1 else 0.0)
        )
        path.append(cash)
    return path


@PROPERTIES
@given(forecast_baselines, scenarios, horizons)
def test_the_runway_is_the_first_month_whose_expected_cash_is_below_zero(
    base: spec.Baseline, assumptions: spec.Assumptions, horizon: int
) -> None:
    cash = plain_cash_path(base, assumptions, horizon)
    # Within rounding noise of half a cent, the two computations may read differently.
    scale = 1e-9 * (abs(float(base.opening_cash)) + sum(abs(c) for c in cash)) + 1e-9
    assume(all(abs(c - fm.NEGATIVE_CASH) > scale for c in cash))
    result = fm.run_forecast(base, assumptions, horizon_months=horizon, paths=5, seed=SEED)
    below = [label for label, c in zip(result.months, cash, strict=True) if round(c, 2) < 0]
    assert result.runway_month == (below[0] if below else None)
    if result.runway_month is not None:
        assert result.cash[result.months.index(result.runway_month)] < 0


@PROPERTIES
@given(st.sampled_from(["2026-11", "1999-01", "2000-12"]), st.integers(1, 120))
def test_month_labels_are_consecutive_months_from_the_start(start: str, horizon: int) -> None:
    labels = fm.month_labels(start, horizon)
    assert labels[0] == start
    indices = [int(label[:4]) * 12 + int(label[5:]) - 1 for label in labels]
    assert indices == list(range(indices[0], indices[0] + horizon))
    assert all(1 <= int(label[5:]) <= 12 for label in labels)


@PROPERTIES
@given(
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=0, max_value=2**32),
    st.booleans(),
    st.booleans(),
)
def test_row_percentiles_equal_numpy_quantiles(
    rows: int, columns: int, seed: int, ties: bool, single: bool
) -> None:
    values = np.random.default_rng(seed).standard_normal((rows, columns)) * 10
    if ties:
        values = np.round(values)
    expected = np.quantile(values, fm.PERCENTILES, axis=1)
    assert np.array_equal(fm.row_percentiles(values.copy(), fm.PERCENTILES), expected)
    narrow = values.astype(np.float32)
    expected = np.quantile(narrow.astype(np.float64), fm.PERCENTILES, axis=1)
    assert np.array_equal(fm.row_percentiles(narrow, fm.PERCENTILES), expected)
    if single:
        median = np.quantile(values, [0.5], axis=1)
        assert np.array_equal(fm.row_percentiles(values.copy(), [0.5]), median)


# --- the Monte Carlo against the formulas -----------------------------------------------------


def test_the_mean_revenue_over_many_paths_is_the_expected_revenue() -> None:
    # Without the -sigma^2/2 drift the mean factor in month 24 would be exp(0.48) = 1.62.
    volatility, horizon, paths = 0.2, 24, 100_000
    factors = np.concatenate(
        [
            block
            for _, block in fm.revenue_factor_blocks(
                fm.generator(SEED), volatility=volatility, horizon_months=horizon, paths=paths
            )
        ]
    )
    base = baseline(
        opening_cash="0",
        monthly_revenue="10000.00",
        monthly_costs="0",
        revenue_growth_rate=0.01,
        revenue_volatility=volatility,
    )
    expected = fm.expected_path(base, spec.Custom(), horizon_months=horizon).revenue
    mean = (factors.astype(np.float64) * expected[:, None]).mean(axis=1)
    months = np.arange(1, horizon + 1)
    standard_error = expected * np.sqrt(np.expm1(months * volatility**2) / paths)
    assert np.all(np.abs(mean - expected) < 4 * standard_error)
    # The median is where the drift shows: exp(-m * sigma^2 / 2) of the expected revenue.
    result = fm.run_forecast(base, spec.Custom(), horizon_months=horizon, paths=20_000, seed=SEED)
    median = np.array(result.bands.revenue.p50) / expected
    assert np.allclose(median, np.exp(-months * volatility**2 / 2), rtol=0.02)


def dense_reference(
    base: spec.Baseline, assumptions: spec.Assumptions, horizon: int, paths: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], float]:
    """Bands and share below zero computed the plain way: whole path matrices in float64,
    np.cumsum and np.quantile, from the same normals (drawn month by month, float32)."""
    sigma = base.revenue_volatility
    z = fm.generator(SEED).standard_normal((horizon, paths), dtype=np.float32)
    months = np.arange(1, horizon + 1)[:, None]
    factors = np.exp(sigma * np.cumsum(z.astype(np.float64), axis=0) - months * sigma**2 / 2)
    path = fm.expected_path(base, assumptions, horizon_months=horizon)
    revenue = path.revenue[:, None] * factors
    one_off = np.diff(np.concatenate([[float(base.opening_cash)], path.cash])) - path.net
    cash = float(base.opening_cash) + np.cumsum(revenue - path.costs[:, None] + one_off[:, None], 0)
    share = float(np.mean((cash < 0).any(axis=0)))
    return (
        np.quantile(revenue, fm.PERCENTILES, axis=1),
        np.quantile(cash, fm.PERCENTILES, axis=1),
        share,
    )


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_the_bands_match_a_dense_reimplementation_of_the_formulas(case: str) -> None:
    hand_base, assumptions, _ = HAND_CASES[case]
    base = msgspec.structs.replace(hand_base, revenue_volatility=0.3)
    horizon, paths = 18, 4000
    result = fm.run_forecast(base, assumptions, horizon_months=horizon, paths=paths, seed=SEED)
    revenue, cash, share = dense_reference(base, assumptions, horizon, paths)
    bands = result.bands
    got_revenue = np.array([bands.revenue.p10, bands.revenue.p50, bands.revenue.p90])
    got_cash = np.array([bands.cash.p10, bands.cash.p50, bands.cash.p90])
    # The walk is summed in float32 (relative error ~1e-6) and the results are in cents.
    scale = float(np.abs(revenue).max())
    assert np.allclose(got_revenue, revenue, rtol=1e-5, atol=0.011)
    assert np.allclose(got_cash, cash, rtol=0, atol=1e-5 * scale * horizon + 0.011)
    assert math.isclose(result.probability_cash_negative, share, abs_tol=2 / paths)
