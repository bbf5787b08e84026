"""Load shedding against a real uvicorn server, on both backends: requests beyond the bound
in flight get an immediate 503 OVERLOADED envelope with Retry-After and their request id,
health is never shed, and the bound frees up when the held requests finish."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import httpx2
import msgspec
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from infra.eventstore import EventLog
from infra.settings import Settings
from service.app import create_app
from service.draining import SheddingProtocol
from tests.conftest import Tenant, command_headers, scenario_body
from tests.services import serving

# Every wait here is bounded: a hung server fails the test instead of hanging the suite.
DEADLINE_S = 30.0
MAX_IN_FLIGHT = 2


# Shed by the API processes' protocol, and by the middleware alone (uvicorn's protocol):
# the answer is the same either way.
PROTOCOLS = {"ours": SheddingProtocol, "uvicorn": HttpToolsProtocol}


@pytest.fixture(params=list(PROTOCOLS))
def base_url(
    settings: Settings, event_log: EventLog, request: pytest.FixtureRequest
) -> Iterator[str]:
    limited = msgspec.structs.replace(settings, max_in_flight=MAX_IN_FLIGHT)
    with serving(create_app(limited, event_log=event_log), http=PROTOCOLS[request.param]) as url:
        yield url


def held_body(release: threading.Event, sent: threading.Semaphore) -> Iterator[bytes]:
    """A JSON body sent in two chunks; the second only once ``release`` is set, so the
    request stays in flight on the server until then. ``sent`` is released once the first
    chunk is on the wire: reading only after that keeps a read from taking a slot before
    a held request arrives (which would then be shed instead of held)."""
    body = json.dumps(scenario_body()).encode()
    yield body[:10]
    sent.release()
    assert release.wait(DEADLINE_S), "the held request was never released"
    yield body[10:]


def held_create(
    base_url: str, writer: str, release: threading.Event, sent: threading.Semaphore
) -> httpx2.Response:
    """A create whose body is held (``held_body``): in flight until ``release``."""
    with httpx2.Client(base_url=base_url, timeout=DEADLINE_S) as client:
        return client.post(
            "/api/scenarios", content=held_body(release, sent), headers=command_headers(writer)
        )


def get(base_url: str, path: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    with httpx2.Client(base_url=base_url, timeout=DEADLINE_S) as client:
        return client.get(path, headers=headers or {})


MESSAGES = {
    "OVERLOADED": "The service is overloaded. Please try again later.",
    "SERVICE_UNAVAILABLE": "The service is unavailable. Please try again later.",
}


def assert_unavailable(response: httpx2.Response, code: str, request_id: str) -> None:
    """A 503 in the envelope of API.md, with Retry-After and the request's id."""
    assert response.status_code == 503, response.text
    assert response.json() == {
        "error": {"code": code, "message": MESSAGES[code], "requestId": request_id}
    }
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Request-Id"] == request_id
    assert response.headers["content-type"] == "application/json"


def wait_until_shed(base_url: str, headers: dict[str, str]) -> httpx2.Response:
    """Reads until one is shed: the held requests have then reached the app."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        response = get(base_url, "/api/scenarios", headers)
        if response.status_code == 503:
            return response
        assert response.status_code == 200, response.text
        assert time.monotonic() < deadline, "the held requests never filled the bound"


def test_requests_beyond_the_bound_are_shed_at_once_and_health_never_is(
    base_url: str, tenant: Tenant, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    read = {"Authorization": f"Bearer {tenant.reader}", "X-Request-Id": "shed-me-1"}
    release = threading.Event()
    sent = threading.Semaphore(0)

    def create() -> httpx2.Response:
        return held_create(base_url, tenant.writer, release, sent)

    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        held = [pool.submit(create) for _ in range(MAX_IN_FLIGHT)]
        try:
            for _ in range(MAX_IN_FLIGHT):
                assert sent.acquire(timeout=DEADLINE_S), "a held request never started"
            shed = wait_until_shed(base_url, read)
            live = get(base_url, "/health/live")
            ready = get(base_url, "/health/ready")
            started = time.monotonic()
            again = get(base_url, "/api/scenarios", read)
            shed_s = time.monotonic() - started
        finally:
            release.set()
        created = [future.result(timeout=DEADLINE_S) for future in held]

    assert_unavailable(shed, "OVERLOADED", "shed-me-1")
    assert again.status_code == 503 and again.json()["error"]["code"] == "OVERLOADED"
    assert shed_s < 5.0, "a shed request must not wait for a slot"
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 200, ready.text
    assert [r.status_code for r in created] == [201] * MAX_IN_FLIGHT
    # The held requests finished: the bound is free again.
    assert get(base_url, "/api/scenarios", read).status_code == 200
    # Which path answered: only the protocol sums up its shed requests in a log line, and
    # only the middleware path goes through the app (an access line per request).
    by_protocol = [r for r in caplog.records if r.name == "accubooks.shedding"]
    if request.node.callspec.params["base_url"] == "ours":
        assert by_protocol and "shed" in by_protocol[0].getMessage()
    else:
        assert not by_protocol


def test_a_burst_is_answered_or_shed_never_failed(base_url: str, tenant: Tenant) -> None:
    read = {"Authorization": f"Bearer {tenant.reader}"}
    count = 40
    barrier = threading.Barrier(count, timeout=DEADLINE_S)

    def burst(index: int) -> httpx2.Response:
        barrier.wait()
        return get(base_url, "/health/live" if index % 4 == 0 else "/api/scenarios", read)

    with ThreadPoolExecutor(max_workers=count) as pool:
        responses = list(pool.map(burst, range(count), timeout=DEADLINE_S))

    for index, response in enumerate(responses):
        if index % 4 == 0:
            assert response.status_code == 200, response.text
        elif response.status_code == 503:
            assert response.json()["error"]["code"] == "OVERLOADED"
            assert response.headers["Retry-After"] == "1"
            assert response.headers["X-Request-Id"]
        else:
            assert response.status_code == 200, response.text


def test_a_shed_command_leaves_its_connection_usable(base_url: str, tenant: Tenant) -> None:
    """A request shed before its body was read (the protocol answers as soon as the
    headers are in): the body is dropped as it comes, and the next request on the same
    keep-alive connection is answered normally."""
    release = threading.Event()
    sent = threading.Semaphore(0)

    def create() -> httpx2.Response:
        return held_create(base_url, tenant.writer, release, sent)

    read = {"Authorization": f"Bearer {tenant.reader}"}
    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        held = [pool.submit(create) for _ in range(MAX_IN_FLIGHT)]
        try:
            for _ in range(MAX_IN_FLIGHT):
                assert sent.acquire(timeout=DEADLINE_S), "a held request never started"
            wait_until_shed(base_url, read)
            with httpx2.Client(base_url=base_url, timeout=DEADLINE_S) as client:
                shed = client.post(
                    "/api/scenarios",
                    content=json.dumps(scenario_body(name="x" * 50_000)).encode(),
                    headers=command_headers(tenant.writer),
                )
                live = client.get("/health/live")
                release.set()
                created = [future.result(timeout=DEADLINE_S) for future in held]
                after = client.get("/api/scenarios", headers=read)
        finally:
            release.set()
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "OVERLOADED"
    assert live.status_code == 200, live.text
    assert after.status_code == 200, after.text
    assert [r.status_code for r in created] == [201] * MAX_IN_FLIGHT


@pytest.fixture
def ours_url(settings: Settings, event_log: EventLog) -> Iterator[str]:
    limited = msgspec.structs.replace(settings, max_in_flight=MAX_IN_FLIGHT)
    with serving(create_app(limited, event_log=event_log), http=SheddingProtocol) as url:
        yield url


def read_answer(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer from a raw connection: status, headers (lower-case), body."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line[9:12]), headers, stream.read(int(headers["content-length"]))


def test_every_shape_of_request_is_shed_right_on_one_connection(
    ours_url: str, tenant: Tenant
) -> None:
    """The protocol answers a whole plain GET before parsing it, and leaves every other
    shape to the parser: a client sees the same answers either way, in order, on one
    keep-alive connection, until it asks to close."""
    host, port = ours_url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {tenant.reader}\r\n"
    plain = f"GET /api/scenarios?limit=5 HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    own_id = f"GET /api/scenarios HTTP/1.1\r\nHost: x\r\nX-Request-Id: mine-7\r\n{auth}\r\n"
    smuggling = (
        f"POST /api/scenarios HTTP/1.1\r\nHost: x\r\nContent-Length: {len(plain)}\r\n"
        f"Content-Type: application/json\r\n{auth}\r\n"
    ).encode()
    closing = f"GET /api/dashboard HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
    release = threading.Event()
    sent = threading.Semaphore(0)
    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        held = [
            pool.submit(held_create, ours_url, tenant.writer, release, sent)
            for _ in range(MAX_IN_FLIGHT)
        ]
        try:
            for _ in range(MAX_IN_FLIGHT):
                assert sent.acquire(timeout=DEADLINE_S), "a held request never started"
            wait_until_shed(ours_url, {"Authorization": f"Bearer {tenant.reader}"})
            with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
                stream = sock.makefile("rb")
                sock.sendall(plain)
                whole = read_answer(stream)
                sock.sendall(own_id.encode())
                echoed = read_answer(stream)
                sock.sendall(plain[:20])  # one request in two reads
                time.sleep(0.05)
                sock.sendall(plain[20:])
                split = read_answer(stream)
                sock.sendall(plain + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                pipelined = [read_answer(stream), read_answer(stream)]
                # A body that reads like a request is a body (no answer of its own).
                sock.sendall(smuggling)
                time.sleep(0.05)
                sock.sendall(plain)
                time.sleep(0.05)
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                smuggled = [read_answer(stream), read_answer(stream)]
                sock.sendall(closing.encode())
                closed = read_answer(stream)
                assert stream.read() == b"", "the connection must be closed as asked"
            with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
                # A header the parser refuses is refused, never shed as if it were fine
                # (its "body" would then be read as a request of its own).
                stream = sock.makefile("rb")
                sock.sendall(plain[:-2] + b"Content-Length : 5\r\n\r\n")
                time.sleep(0.05)
                sock.sendall(b"GET /")
                refused = read_answer(stream)
                assert stream.read() == b"", "a refused request closes its connection"
        finally:
            release.set()
        created = [future.result(timeout=DEADLINE_S) for future in held]

    for status, headers, body in [whole, echoed, split, pipelined[0], smuggled[0], closed]:
        assert status == 503
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] == "OVERLOADED" and error["requestId"] == headers["x-request-id"]
    assert refused[0] == 400
    assert echoed[1]["x-request-id"] == "mine-7"
    ids = [answer[1]["x-request-id"] for answer in (whole, split, pipelined[0], closed)]
    assert len(set(ids)) == len(ids), "every shed request gets its own id"
    for _, _, body in (pipelined[1], smuggled[1]):
        assert json.loads(body) == {"status": "ok"}
    assert "connection" not in whole[1] and closed[1]["connection"] == "close"
    assert [r.status_code for r in created] == [201] * MAX_IN_FLIGHT
    assert (
        get(ours_url, "/api/scenarios", {"Authorization": f"Bearer {tenant.reader}"}).status_code
        == 200
    )
