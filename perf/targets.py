"""Issue 7's targets, each read off the benchmarks' JSON reports: the measured figure as
text and whether it meets the target (None when the report lacks it)."""

from __future__ import annotations

from typing import Any

from perf.run_all import Target, dig, find, num

Reports = dict[str, dict[str, Any] | None]


def _all(*flags: bool | None) -> bool | None:
    if any(f is None for f in flags):
        return None
    return all(bool(f) for f in flags)


def _le(value: Any, limit: float) -> bool | None:
    return None if value is None else float(value) <= limit


def _ge(value: Any, limit: float) -> bool | None:
    return None if value is None else float(value) >= limit


def forecast(r: Reports) -> tuple[str, bool | None]:
    sizes = dig(r.get("model"), "sizes")
    ten = dig(find(sizes, paths=10_000), "model_ms_median")
    hundred = dig(find(sizes, paths=100_000), "model_ms_median")
    return f"{num(ten)} ms / {num(hundred)} ms", _all(_le(ten, 50), _le(hundred, 500))


def rebuild(r: Reports) -> tuple[str, bool | None]:
    report = r.get("rebuild")
    rate = dig(report, "switch.events_per_s")
    rss = dig(report, "switch.peak_rss_mb")
    events = dig(report, "events")
    return (
        f"{num(rate, 0)} events/s over {num(events)} events; peak RSS {num(rss)} MB",
        _all(_ge(rate, 50_000), _le(rss, 250), _ge(events, 1_000_000)),
    )


def api_rss(r: Reports) -> tuple[str, bool | None]:
    seen = [float(v) for v in dig(r.get("seed_load"), "api_rss_mb") or []]
    if not seen:
        return "not measured", None
    return f"{max(seen):g} MB (peak, seed load test)", max(seen) <= 150


TARGETS = [
    Target(
        "forecast 120 x 10,000 / 100,000 paths",
        "<= 50 ms / <= 500 ms",
        forecast,
    ),
    Target(
        "rebuild 1M events, PostgreSQL",
        ">= 50,000 events/s; worker RSS <= 250 MB",
        rebuild,
    ),
    Target("API process RSS under load", "<= 150 MB", api_rss),
]
