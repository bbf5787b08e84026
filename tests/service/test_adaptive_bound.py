"""The in-flight bound that follows latency (ACCUBOOKS_SHED_LATENCY_TARGET_MS): lowered
while admitted requests take longer than the target, raised back when they are faster,
never past its floor or ACCUBOOKS_MAX_IN_FLIGHT; and, in a real server, a lowered bound
sheds requests that the configured one would have admitted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest

from infra.eventstore import EventLog
from infra.settings import Settings
from service import shedding
from service.app import create_app
from service.draining import SheddingProtocol
from tests.conftest import Tenant
from tests.service.test_shedding import DEADLINE_S, get, held_create
from tests.services import serving


def gate(max_in_flight: int, target_s: float) -> shedding.Gate:
    return shedding.Gate(
        max_in_flight,
        request_id=lambda scope: "id",
        observe=lambda scope, status, seconds: None,
        latency_target_s=target_s,
    )


def window(bound: shedding.Gate, seconds: float) -> int:
    """One full window of requests that each took ``seconds``: the bound after it."""
    time.sleep(shedding.WINDOW_S)
    for _ in range(shedding.WINDOW_REQUESTS):
        bound.finished(seconds)
    return bound.limit


def test_the_bound_falls_while_requests_are_slower_than_the_target_and_rises_back() -> None:
    bound = gate(64, target_s=0.010)
    # Four times the target: cut by half at most per window, down to the floor.
    assert [window(bound, 0.040) for _ in range(5)] == [32, 16, 8, 4, 4]
    assert bound.full() is False
    bound.in_flight = 4
    assert bound.full(), "at the lowered bound, the next request is shed"
    bound.in_flight = 0
    # 1.3 times the target: cut by the ratio itself (under the halving limit).
    bound = gate(64, target_s=0.010)
    assert window(bound, 0.013) == round(64 * 0.010 / 0.013)
    # Faster than the target: back up by a quarter a window, never above the maximum.
    rising = [window(bound, 0.002) for _ in range(4)]
    assert rising == sorted(rising) and rising[-1] == 64
    assert rising[0] == round(64 * 0.010 / 0.013 * 1.25)


def test_the_bound_holds_without_a_target_or_a_full_window() -> None:
    fixed = gate(64, target_s=0.0)
    assert window(fixed, 5.0) == 64
    waiting = gate(64, target_s=0.010)
    for _ in range(shedding.WINDOW_REQUESTS - 1):
        waiting.finished(1.0)
    assert waiting.limit == 64, "fewer requests than a window move nothing"
    quick = gate(64, target_s=0.010)
    for _ in range(shedding.WINDOW_REQUESTS * 3):
        quick.finished(1.0)  # a burst inside one WINDOW_S: one window at most
    assert quick.limit in (64, 32)
    small = gate(2, target_s=0.010)
    assert window(small, 1.0) == 2, "a bound under the floor is never raised to it"


@pytest.fixture
def adaptive_url(settings: Settings, event_log: EventLog) -> Iterator[str]:
    # Every request takes longer than a microsecond: the bound falls to its floor.
    adaptive = msgspec.structs.replace(settings, max_in_flight=16, shed_latency_target_ms=0.001)
    with serving(create_app(adaptive, event_log=event_log), http=SheddingProtocol) as url:
        yield url


def test_a_server_sheds_past_its_lowered_bound_and_says_so(
    adaptive_url: str, tenant: Tenant
) -> None:
    read = {"Authorization": f"Bearer {tenant.reader}"}
    deadline = time.monotonic() + DEADLINE_S
    while (
        f"accubooks_in_flight_limit {float(shedding.MIN_LIMIT)}"
        not in get(adaptive_url, "/metrics").text
    ):
        assert get(adaptive_url, "/api/scenarios", read).status_code == 200
        assert time.monotonic() < deadline, "the bound never fell"
    release = threading.Event()
    sent = threading.Semaphore(0)
    with ThreadPoolExecutor(max_workers=shedding.MIN_LIMIT) as pool:
        held = [
            pool.submit(held_create, adaptive_url, tenant.writer, release, sent)
            for _ in range(shedding.MIN_LIMIT)
        ]
        try:
            for _ in range(shedding.MIN_LIMIT):
                assert sent.acquire(timeout=DEADLINE_S), "a held request never started"
            # Four in flight of the sixteen configured: shed all the same, once the held
            # requests have reached the app.
            while (shed := get(adaptive_url, "/api/scenarios", read)).status_code == 200:
                assert time.monotonic() < deadline, "the held requests never filled the bound"
            live = get(adaptive_url, "/health/live")
        finally:
            release.set()
        created = [future.result(timeout=DEADLINE_S) for future in held]
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "OVERLOADED"
    assert live.status_code == 200
    assert [r.status_code for r in created] == [201] * shedding.MIN_LIMIT
