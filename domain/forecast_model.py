"""The forecast model of DESIGN.md ("Forecasts: the model"): a scenario's expected path and
its Monte Carlo bands, computed with NumPy and reproducible from the forecast id.

Choices, measured by perf/model_bench.py (120 months x 100,000 paths):
- The random part is float32 (normals, their running sum, the revenue factor); every money
  amount, expected or per path, is float64 as DESIGN.md asks.
- Months are simulated in blocks of about ``BLOCK_VALUES`` path-months (6 months of 100,000
  paths, the whole horizon of 2,000). Peak memory stays near 13 MB, against 157 MB for whole
  120 x 100,000 matrices; small forecasts pay fewer Python-level steps. The generator's stream
  does not depend on the block size, so neither does the result.
- Running sums over months add whole rows (one vector add per month): NumPy's cumsum along
  the month axis walks the matrix column by column and measured nine times slower.
- Percentiles are NumPy's default ("linear") quantiles, picked with single-kth partitions
  (NumPy's multi-kth partition measured five times slower than the three single ones).
- Results are rounded with Python's ``round(x, 2)``: correctly rounded from the float64 value,
  and never -0.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, assert_never
from uuid import UUID

import msgspec
import numpy as np
import numpy.typing as npt

from domain import scenario_spec as spec

Float64Array = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]

PERCENTILES: Final = (0.1, 0.5, 0.9)
BLOCK_VALUES: Final = 600_000
# Money is reported to the cent, so cash is below zero when it reads negative once rounded:
# at or below the double nearest -0.005 (which lies just below -0.005, and round() sends it
# to -0.01). Float noise such as 0.30 - 0.10 - 0.10 - 0.10 = -2.8e-17 is not a runway.
NEGATIVE_CASH: Final = -0.005


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    p10: list[float]
    p50: list[float]
    p90: list[float]


class Bands(msgspec.Struct, frozen=True, kw_only=True):
    revenue: Percentiles
    cash: Percentiles


class ForecastResult(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A completed forecast's ``result`` (API.md): one number per month, rounded to cents;
    ``bands`` are the Monte Carlo percentiles. Also the documented schema of the result."""

    months: list[spec.Month]
    revenue: list[float]
    costs: list[float]
    net: list[float]
    cash: list[float]
    bands: Bands
    runway_month: spec.Month | None
    probability_cash_negative: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    paths: int


@dataclass(frozen=True, slots=True)
class ExpectedPath:
    """The expected path, unrounded, month m at index m - 1."""

    months: list[str]
    revenue: Float64Array
    costs: Float64Array
    net: Float64Array
    cash: Float64Array


@dataclass(frozen=True, slots=True)
class _Effects:
    revenue_factor: float = 1.0
    cost_factor: float = 1.0
    added_costs: float = 0.0
    one_off_cash: float = 0.0


def _effects(assumptions: spec.Assumptions) -> _Effects:
    match assumptions:
        case spec.RevenueIncrease():
            return _Effects(revenue_factor=1 + assumptions.percent / 100)
        case spec.CostReduction():
            return _Effects(cost_factor=1 - assumptions.percent / 100)
        case spec.Hiring():
            # The product is exact in Decimal and then rounded once to a double.
            added = assumptions.headcount * assumptions.monthly_cost_per_head
            return _Effects(added_costs=float(added))
        case spec.PriceChange():
            factor = (1 + assumptions.percent / 100) * (1 - assumptions.churn_percent / 100)
            return _Effects(revenue_factor=factor)
        case spec.Custom():
            return _Effects(
                revenue_factor=1 + assumptions.revenue_percent / 100,
                cost_factor=1 + assumptions.cost_percent / 100,
                one_off_cash=float(assumptions.one_off_cash),
            )
        case _:
            assert_never(assumptions)


def month_labels(start_month: str, horizon_months: int) -> list[str]:
    """startMonth + (m - 1) for m = 1..horizon, as YYYY-MM; ValueError past 9999-12."""
    year, month = (int(part) for part in start_month.split("-"))
    first = year * 12 + month - 1
    if first + horizon_months - 1 > 9999 * 12 + 11:
        raise ValueError("the forecast would run past 9999-12")
    return [f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(first, first + horizon_months)]


def expected_path(
    baseline: spec.Baseline, assumptions: spec.Assumptions, *, horizon_months: int
) -> ExpectedPath:
    """DESIGN.md's expected path; each effect applies to the months m > startOffsetMonths."""
    if horizon_months < 1:
        raise ValueError("horizon_months must be at least 1")
    effects = _effects(assumptions)
    offset = assumptions.start_offset_months
    elapsed = np.arange(horizon_months, dtype=np.float64)  # m - 1
    active = elapsed >= offset
    revenue = (
        float(baseline.monthly_revenue)
        * np.power(1.0 + baseline.revenue_growth_rate, elapsed)
        * np.where(active, effects.revenue_factor, 1.0)
    )
    costs = float(baseline.monthly_costs) * np.power(
        1.0 + baseline.cost_growth_rate, elapsed
    ) * np.where(active, effects.cost_factor, 1.0) + np.where(active, effects.added_costs, 0.0)
    net = revenue - costs
    # cash(m) = cash(m - 1) + net(m) + oneOff(m), summed in that order from openingCash.
    flows = np.empty(horizon_months + 1, dtype=np.float64)
    flows[0] = float(baseline.opening_cash)
    flows[1:] = net
    if offset < horizon_months and effects.one_off_cash:
        flows[offset + 1] += effects.one_off_cash
    return ExpectedPath(
        months=month_labels(baseline.start_month, horizon_months),
        revenue=revenue,
        costs=costs,
        net=net,
        cash=np.cumsum(flows)[1:],
    )


def generator(seed: UUID | int) -> np.random.Generator:
    """PCG64 seeded from the forecast id (all 128 bits), or from a non-negative integer."""
    return np.random.Generator(np.random.PCG64(seed.int if isinstance(seed, UUID) else seed))


def revenue_factor_blocks(
    rng: np.random.Generator,
    *,
    volatility: float,
    horizon_months: int,
    paths: int,
    months_per_block: int | None = None,
) -> Iterator[tuple[int, Float32Array]]:
    """exp(sum over k = 1..m of (sigma * z_k - sigma^2 / 2)) for every path, as blocks of rows
    (month m at row m - 1 overall) with the index of their first month; blocks hold
    ``months_per_block`` months, by default as many as fit in ``BLOCK_VALUES`` values. The
    normals are drawn month by month in one stream, so the factors do not depend on it."""
    sigma = np.float32(volatility)
    drift = (-0.5 * volatility * volatility * np.arange(1, horizon_months + 1)).astype(np.float32)
    walk = np.zeros(paths, dtype=np.float32)  # sum of z_k up to the previous block
    step = months_per_block or max(1, BLOCK_VALUES // paths)
    for start in range(0, horizon_months, step):
        stop = min(start + step, horizon_months)
        block = rng.standard_normal((stop - start, paths), dtype=np.float32)
        _running_sum(block, walk)
        walk = block[-1].copy()
        block *= sigma
        block += drift[start:stop, None]
        # For sigma <= 2 the exponent stays far below float32's limit of 88; factors that
        # underflow to 0 were below 1e-38 of the expected revenue.
        np.exp(block, out=block)
        yield start, block


def _running_sum(block: npt.NDArray[Any], carry: npt.NDArray[Any]) -> None:
    """Rows become running sums down the month axis, continuing from ``carry``."""
    block[0] += carry
    for row in range(1, block.shape[0]):
        np.add(block[row], block[row - 1], out=block[row])


def row_percentiles(rows: npt.NDArray[Any], quantiles: Sequence[float]) -> Float64Array:
    """np.quantile(rows, quantiles, axis=1) by the default "linear" method, as float64 with
    one row per quantile. ``rows`` is reordered within each row (partitioned) in place."""
    n = rows.shape[1]
    positions = [(n - 1) * q for q in quantiles]
    lows = [math.floor(p) for p in positions]
    points = sorted(set(lows))
    _select(rows, points, 0, n)
    out = np.empty((len(quantiles), rows.shape[0]), dtype=np.float64)
    for i, (position, low) in enumerate(zip(positions, lows, strict=True)):
        below = rows[:, low].astype(np.float64)
        if low + 1 >= n:
            out[i] = below
            continue
        # Everything between two selected points lies between their values, so the next
        # order statistic is the smallest value up to the following point.
        following = next((p for p in points if p > low), n)
        above = (
            rows[:, following] if following == low + 1 else rows[:, low + 1 : following].min(1)
        ).astype(np.float64)
        out[i] = _lerp(below, above, position - low)
    return out


def _select(rows: npt.NDArray[Any], points: list[int], lo: int, hi: int) -> None:
    """Put the order statistics ``points`` (all in [lo, hi)) in place, middle one first."""
    if not points:
        return
    middle = len(points) // 2
    point = points[middle]
    rows[:, lo:hi].partition(point - lo, axis=1)
    _select(rows, points[:middle], lo, point)
    _select(rows, points[middle + 1 :], point + 1, hi)


def _lerp(below: Float64Array, above: Float64Array, weight: float) -> Float64Array:
    # NumPy's own interpolation, so that the bands equal np.quantile's to the bit.
    diff = above - below
    if weight >= 0.5:
        return above - diff * (1 - weight)
    return below + diff * weight


def run_forecast(
    baseline: spec.Baseline,
    assumptions: spec.Assumptions,
    *,
    horizon_months: int,
    paths: int,
    seed: UUID | int,
    months_per_block: int | None = None,
) -> ForecastResult:
    """The forecast's result: expected path, percentile bands over ``paths`` Monte Carlo
    paths and the share of paths whose cash goes below zero in any month. The same seed
    (normally the forecast id) gives the same result whatever ``months_per_block``."""
    if paths < 1 or (months_per_block is not None and months_per_block < 1):
        raise ValueError("paths and months_per_block must be at least 1")
    path = expected_path(baseline, assumptions, horizon_months=horizon_months)
    factor_bands = np.empty((len(PERCENTILES), horizon_months), dtype=np.float64)
    deviation_bands = np.empty_like(factor_bands)
    # A path's cash is its expected cash plus the running sum of revenue(m) * (factor - 1).
    deviation = np.zeros(paths, dtype=np.float64)
    threshold = NEGATIVE_CASH - path.cash
    negative = np.zeros(paths, dtype=np.bool_)
    blocks = revenue_factor_blocks(
        generator(seed),
        volatility=baseline.revenue_volatility,
        horizon_months=horizon_months,
        paths=paths,
        months_per_block=months_per_block,
    )
    for start, factors in blocks:
        stop = start + factors.shape[0]
        deviations = np.subtract(factors, 1.0, dtype=np.float64)
        deviations *= path.revenue[start:stop, None]
        _running_sum(deviations, deviation)
        deviation = deviations[-1].copy()
        negative |= (deviations <= threshold[start:stop, None]).any(axis=0)
        factor_bands[:, start:stop] = row_percentiles(factors, PERCENTILES)
        deviation_bands[:, start:stop] = row_percentiles(deviations, PERCENTILES)
    # Revenue is never negative, so scaling the factors' percentiles keeps them percentiles;
    # with zero volatility every factor is exactly 1 and the bands are the expected path.
    revenue_bands = factor_bands * path.revenue
    cash_bands = deviation_bands + path.cash
    cash = _cents(path.cash)
    return ForecastResult(
        months=path.months,
        revenue=_cents(path.revenue),
        costs=_cents(path.costs),
        net=_cents(path.net),
        cash=cash,
        bands=Bands(revenue=_percentiles(revenue_bands), cash=_percentiles(cash_bands)),
        runway_month=next((m for m, c in zip(path.months, cash, strict=True) if c < 0), None),
        probability_cash_negative=round(int(negative.sum()) / paths, 4),
        paths=paths,
    )


def _cents(values: Float64Array) -> list[float]:
    # + 0.0 turns -0.0 into 0.0.
    return [round(value, 2) + 0.0 for value in values.tolist()]


def _percentiles(bands: Float64Array) -> Percentiles:
    p10, p50, p90 = (_cents(band) for band in bands)
    return Percentiles(p10=p10, p50=p50, p90=p90)
