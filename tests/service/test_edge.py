"""The edge (deploy/haproxy.cfg, HAProxy) in front of a real API server, on both backends:
requests pass through with their answers and ids; beyond its bound in flight and its queue
a request gets the API's own 503 OVERLOADED envelope at once, without reaching the API;
health is never shed; an API that cannot be reached is 503 SERVICE_UNAVAILABLE in the same
envelope; and the edge admits again as soon as the held requests finish."""

from __future__ import annotations

import csv
import io
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx2
import pytest

from infra.eventstore import EventLog
from infra.settings import Settings
from perf.harness import Deadline
from perf.processes import Edge, edge_proxy, free_port
from service.app import create_app
from tests.conftest import Tenant, command_headers, scenario_body
from tests.service.test_shedding import DEADLINE_S, assert_unavailable, get, held_create
from tests.services import serving, unavailable

SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@pytest.fixture
def api_url(settings: Settings, event_log: EventLog) -> Iterator[str]:
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with serving(app) as url:
        yield url


@contextmanager
def edge_in_front_of(api_url: str, *, max_in_flight: int, queue: int) -> Iterator[Edge]:
    if shutil.which("haproxy") is None:
        unavailable("haproxy", FileNotFoundError("apt-get install -y haproxy"))
    with edge_proxy(
        api_url,
        Deadline(time.monotonic() + DEADLINE_S),
        max_in_flight=max_in_flight,
        queue=queue,
    ) as edge:
        yield edge


@pytest.fixture
def edge(api_url: str) -> Iterator[Edge]:
    with edge_in_front_of(api_url, max_in_flight=1, queue=1) as edge:
        yield edge


def occupancy(edge: Edge) -> tuple[int, int]:
    """(requests in the API, requests waiting for a slot), as the edge counts them."""
    response = httpx2.get(edge.stats_url + "/stats;csv", timeout=DEADLINE_S)
    rows = {
        row["svname"]: row
        for row in csv.DictReader(io.StringIO(response.text.removeprefix("# ")))
        if row["pxname"] == "api"
    }
    return int(rows["api"]["scur"]), int(rows["BACKEND"]["qcur"])


def test_requests_pass_through_the_edge_with_their_answers(edge: Edge, tenant: Tenant) -> None:
    headers = {**command_headers(tenant.writer), "X-Request-Id": "edge-create-1"}
    with httpx2.Client(base_url=edge.url, timeout=DEADLINE_S) as client:
        created = client.post("/api/scenarios", json=scenario_body(), headers=headers)
        replayed = client.post("/api/scenarios", json=scenario_body(), headers=headers)
        listed = client.get(
            "/api/scenarios",
            headers={
                "Authorization": f"Bearer {tenant.reader}",
                "X-Consistency-Token": created.headers["X-Consistency-Token"],
                "X-Request-Id": 'not sane "id"',
            },
        )
        unauthorized = client.get("/api/scenarios")
    assert created.status_code == 201, created.text
    assert created.headers["X-Request-Id"] == "edge-create-1"
    assert created.headers["ETag"] == '"1"'
    assert replayed.status_code == 201
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.content == created.content
    assert listed.status_code == 200, listed.text
    assert [s["id"] for s in listed.json()["data"]] == [created.json()["id"]]
    # An id the API would not take is replaced by the edge, and the API answers with it.
    assert SANE_ID.match(listed.headers["X-Request-Id"])
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["requestId"] == unauthorized.headers["X-Request-Id"]


def test_beyond_its_bound_and_queue_the_edge_sheds_at_once_and_health_passes(
    edge: Edge, api_url: str, tenant: Tenant
) -> None:
    read = {"Authorization": f"Bearer {tenant.reader}", "X-Request-Id": "edge-shed-1"}
    release = threading.Event()
    sent = threading.Semaphore(0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(held_create, edge.url, tenant.writer, release, sent) for _ in range(2)]
        try:
            for _ in held:
                assert sent.acquire(timeout=DEADLINE_S), "a held request never started"
            # One held request in the API, the other waiting at the edge for its slot.
            deadline = time.monotonic() + DEADLINE_S
            while occupancy(edge) != (1, 1):
                assert time.monotonic() < deadline, (
                    f"never one in and one queued: {occupancy(edge)}"
                )
                time.sleep(0.01)
            started = time.monotonic()
            shed = get(edge.url, "/api/scenarios", read)
            shed_s = time.monotonic() - started
            unnamed = get(edge.url, "/api/dashboard", {"Authorization": read["Authorization"]})
            live = get(edge.url, "/health/live")
            ready = get(edge.url, "/health/ready")
            # The API itself was never full: the edge answered, not the API.
            direct = get(api_url, "/api/scenarios", read)
        finally:
            release.set()
        created = [future.result(timeout=DEADLINE_S) for future in held]

    assert_unavailable(shed, "OVERLOADED", "edge-shed-1")
    assert shed_s < 5.0, "a shed request must not wait for a slot"
    assert unnamed.status_code == 503 and unnamed.json()["error"]["code"] == "OVERLOADED"
    assert unnamed.json()["error"]["requestId"] == unnamed.headers["X-Request-Id"]
    assert SANE_ID.match(unnamed.headers["X-Request-Id"])
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 200, ready.text
    assert direct.status_code == 200, direct.text
    # Both held commands were served, the queued one once the first had finished.
    assert [r.status_code for r in created] == [201, 201]
    assert occupancy(edge) == (0, 0)
    assert get(edge.url, "/api/scenarios", read).status_code == 200


def test_an_api_that_cannot_be_reached_is_service_unavailable_in_the_envelope() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    with edge_in_front_of(nobody, max_in_flight=1, queue=1) as edge:
        answer = get(edge.url, "/api/scenarios", {"X-Request-Id": "edge-down-1"})
    assert_unavailable(answer, "SERVICE_UNAVAILABLE", "edge-down-1")
