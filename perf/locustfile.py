"""The seed's load test as locust users: 100 users, a bounded number of requests, the
seed's read endpoints in the read mix's proportions, plus a share of commands with fresh
Idempotency-Keys and deliberate replays of earlier ones, which must come back byte for
byte (with the JSON keys reordered and the whitespace changed on the replay).

Run by perf.seed_load (which seeds the topology and writes the plan); by hand:

    ACCUBOOKS_LOCUST_PLAN=plan.json .venv/bin/locust -f perf/locustfile.py --headless \\
        -u 100 -r 100 -t 300s

The plan (JSON): apiUrls, reads ([route, path, reader key] lines), writers ([{key,
scenarioIds}]), limit (requests in all), commandShare, replayShare, forecastShare, and
out (where the replay check's counts are written when the run ends).
"""

from __future__ import annotations

import os
import random
import threading
import uuid
from typing import Any

import gevent
import msgspec
from locust import FastHttpUser, events, task
from locust.env import Environment

_PLAN: dict[str, Any] = msgspec.json.decode(
    open(os.environ["ACCUBOOKS_LOCUST_PLAN"], "rb").read()  # noqa: SIM115
)
_LOCK = threading.Lock()
_COUNTS = {"requests": 0, "commands": 0, "replays": 0, "replayMismatches": 0, "forecasts": 0}
_STOPPING = [False]

_BASELINE = {
    "startMonth": "2026-01",
    "openingCash": "250000.00",
    "monthlyRevenue": "40000",
    "monthlyCosts": "35000.50",
    "revenueGrowthRate": 0.02,
}


@events.request.add_listener
def _count(**_: Any) -> None:
    """Stops the whole run once ``limit`` requests have been answered."""
    _COUNTS["requests"] += 1
    if _COUNTS["requests"] >= int(_PLAN["limit"]) and not _STOPPING[0]:
        _STOPPING[0] = True
        runner = _ENV[0].runner if _ENV else None
        if runner is not None:
            gevent.spawn(runner.quit)


_ENV: list[Environment] = []


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    _ENV.append(environment)


def _entry(stats: Any) -> dict[str, Any]:
    """One locust stats entry as plain figures (times in ms)."""
    duration = max(1e-9, stats.last_request_timestamp - stats.start_time)
    return {
        "name": stats.name,
        "requests": stats.num_requests,
        "failures": stats.num_failures,
        "reqPerS": stats.num_requests / duration,
        "p50": stats.get_response_time_percentile(0.5),
        "p95": stats.get_response_time_percentile(0.95),
        "p99": stats.get_response_time_percentile(0.99),
        "max": stats.max_response_time,
    }


@events.quitting.add_listener
def _write_results(environment: Environment, **_: Any) -> None:
    """The final figures, from locust's own stats when the run ends."""
    out = _PLAN.get("out")
    if not out:
        return
    stats = environment.stats
    results = {
        "counts": _COUNTS,
        "total": _entry(stats.total),
        "entries": [_entry(entry) for entry in stats.entries.values()],
        "errors": [
            {"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
            for e in stats.errors.values()
        ],
    }
    with open(out, "wb") as f:
        f.write(msgspec.json.encode(results))


class Client(FastHttpUser):
    """One of the seed's concurrent users: no think time (as ab ran it), each request
    drawn from the plan's shares."""

    # Each user talks to one API process, spread evenly over them.
    _next = [0]

    def on_start(self) -> None:
        urls: list[str] = _PLAN["apiUrls"]
        self.client.base_url = urls[self._next[0] % len(urls)]
        self._next[0] += 1
        self.rng = random.Random()
        self.reads: list[list[str]] = _PLAN["reads"]
        self.position = self.rng.randrange(len(self.reads))
        self.sent: list[tuple[str, str, dict[str, Any], int, bytes]] = []

    @task
    def one_request(self) -> None:
        if _STOPPING[0]:
            self.stop()
            return
        draw = self.rng.random()
        commands = float(_PLAN["commandShare"])
        replays = commands + float(_PLAN["replayShare"])
        forecasts = replays + float(_PLAN["forecastShare"])
        if draw < commands:
            self.create_scenario()
        elif draw < replays and self.sent:
            self.replay()
        elif draw < forecasts:
            self.generate_forecast()
        else:
            self.read()

    def read(self) -> None:
        route, path, key = self.reads[self.position % len(self.reads)]
        self.position += 1
        self.client.get(path, name=route, headers={"Authorization": f"Bearer {key}"})

    def _writer(self) -> dict[str, Any]:
        writer: dict[str, Any] = self.rng.choice(_PLAN["writers"])
        return writer

    def create_scenario(self) -> None:
        writer = self._writer()
        key = f"locust-{uuid.uuid4()}"
        body = {
            "name": f"Load test {key[-8:]}",
            "type": "COST_REDUCTION",
            "baseline": _BASELINE,
            "assumptions": {"percent": self.rng.randint(1, 30)},
        }
        with self.client.post(
            "/api/scenarios",
            name="create scenario",
            data=msgspec.json.encode(body).decode(),
            headers={
                "Authorization": f"Bearer {writer['key']}",
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            },
            catch_response=True,
        ) as answer:
            _COUNTS["commands"] += 1
            if answer.status_code != 201:
                answer.failure(f"create answered {answer.status_code}: {answer.text[:200]}")
                return
            answer.success()
            self.sent.append((writer["key"], key, body, answer.status_code, answer.content or b""))

    def replay(self) -> None:
        writer_key, key, body, status, first = self.rng.choice(self.sent)
        # The same command, its keys in another order and other whitespace: the same
        # request by API.md's rules, so the stored answer, byte for byte.
        reordered = dict(reversed(list(body.items())))
        data = msgspec.json.format(msgspec.json.encode(reordered), indent=3)
        with self.client.post(
            "/api/scenarios",
            name="replay create",
            data=data.decode(),
            headers={
                "Authorization": f"Bearer {writer_key}",
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            },
            catch_response=True,
        ) as answer:
            _COUNTS["replays"] += 1
            replayed = answer.headers.get("Idempotent-Replayed") == "true"
            if answer.status_code != status or answer.content != first or not replayed:
                _COUNTS["replayMismatches"] += 1
                answer.failure(
                    f"replay answered {answer.status_code} (replayed={replayed}), "
                    f"body identical: {answer.content == first}"
                )
            else:
                answer.success()

    def generate_forecast(self) -> None:
        writer = self._writer()
        body = {
            "scenarioId": self.rng.choice(writer["scenarioIds"]),
            "horizonMonths": 24,
            "paths": 1000,
        }
        with self.client.post(
            "/api/forecasts/generate",
            name="generate forecast",
            data=msgspec.json.encode(body).decode(),
            headers={
                "Authorization": f"Bearer {writer['key']}",
                "Content-Type": "application/json",
                "Idempotency-Key": f"locust-{uuid.uuid4()}",
            },
            catch_response=True,
        ) as answer:
            _COUNTS["forecasts"] += 1
            if answer.status_code != 202:
                answer.failure(f"generate answered {answer.status_code}: {answer.text[:200]}")
            else:
                answer.success()
