"""Hostile input on every command and list route (enumerated from the OpenAPI
declarations): huge, deep, mis-encoded, mis-typed or non-finite bodies, out-of-range
paging and forged cursors each get their documented 4xx in the error envelope, append
nothing, and never a 5xx; the transport cases run against a real uvicorn server."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx2
import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra import apidoc
from infra.eventstore import EventLog
from infra.settings import Settings
from service import openapi
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body
from tests.readapi.test_reads import read, settle
from tests.services import serving

MIB = 1024 * 1024
TEN_MIB = 10 * MIB
PLACEHOLDER = "__RAW__"
COMMAND_OPS = [op for op in openapi.OPERATIONS if op.is_command]
COMMANDS = [pytest.param(op, id=op.operation_id) for op in COMMAND_OPS]
PAGED = [
    pytest.param(op, id=op.operation_id)
    for op in openapi.OPERATIONS
    if any(p.name == "limit" and p.where == "query" for p in op.params)
]
CURSORED = [
    pytest.param(op, id=op.operation_id)
    for op in openapi.OPERATIONS
    if any(p.name == "cursor" and p.where == "query" for p in op.params)
]

# Where each command's body has numbers; a new command must say (the first test fails).
NUMBER_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "createScenario": (("baseline", "monthlyCosts"), ("assumptions", "headcount")),
    "updateScenario": (("baseline", "revenueGrowthRate"),),
    "archiveScenario": (),
    "generateForecast": (("horizonMonths",), ("paths",)),
}
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """SQLite only: these cases are about the HTTP edge, not the store."""
    return Settings(data_dir=str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def scenario_id(client: TestClient, tenant: Tenant) -> str:
    response = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    created: str = response.json()["id"]
    return created


def valid_body(op: apidoc.Operation, scenario_id: str) -> dict[str, Any]:
    bodies: dict[str, dict[str, Any]] = {
        "createScenario": scenario_body(),
        "updateScenario": {"baseline": scenario_body()["baseline"]},
        "archiveScenario": {},
        "generateForecast": {"scenarioId": scenario_id, "horizonMonths": 12, "paths": 100},
    }
    return bodies[op.operation_id]


def path_of(op: apidoc.Operation, scenario_id: str) -> str:
    return op.path.replace("{scenario_id}", scenario_id)


def with_raw(body: dict[str, Any], where: tuple[str, ...], raw: bytes) -> bytes:
    """``body`` as JSON with the value at ``where`` spelled as raw (maybe invalid) JSON."""
    copy = json.loads(json.dumps(body))
    target = copy
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = PLACEHOLDER
    return json.dumps(copy).encode().replace(f'"{PLACEHOLDER}"'.encode(), raw)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def answered(prefix: str = "") -> float:
    """Requests the service has finished so far in this process, with a status starting
    with ``prefix``."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "accubooks_request_duration_seconds":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels["status"].startswith(prefix):
                total += sample.value
    return total


def server_errors() -> float:
    return answered("5")


def assert_refused(
    response: httpx2.Response, status: int, code: str, event_log: EventLog, position: int
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert error["requestId"] == response.headers["X-Request-Id"]
    assert event_log.position() == position


def test_every_command_says_where_its_numbers_are() -> None:
    assert {op.operation_id for op in COMMAND_OPS} == set(NUMBER_FIELDS)


def body_cases(op: apidoc.Operation) -> Iterator[tuple[str, bytes, dict[str, str], int, str]]:
    """(case, body, header changes, status, code) for one command."""
    json_type = {"Content-Type": "application/json"}
    yield "10-MiB", b" " * TEN_MIB, json_type, 413, "PAYLOAD_TOO_LARGE"
    yield "nested-1000-arrays", nested(1000), json_type, 400, "VALIDATION_ERROR"
    yield "nested-1000-objects", nested_objects(1000), json_type, 400, "VALIDATION_ERROR"
    yield "invalid-utf8", b'{"\xff\xfe": "\xc3\x28"}', json_type, 400, "VALIDATION_ERROR"
    yield "utf16", '{"name": "x"}'.encode("utf-16"), json_type, 400, "VALIDATION_ERROR"
    for value in (b"[]", b'"text"', b"42", b"null", b"true", b"{} {}", b"{"):
        yield f"not-an-object-{value.decode()}", value, json_type, 400, "VALIDATION_ERROR"
    if op.request_body_required:
        yield "empty", b"", json_type, 400, "VALIDATION_ERROR"
    for content_type in ("text/plain", "application/xml", "application/x-www-form-urlencoded"):
        headers = {"Content-Type": content_type}
        yield f"content-type-{content_type}", b"{}", headers, 415, "UNSUPPORTED_MEDIA_TYPE"


@pytest.mark.parametrize("op", COMMANDS)
def test_hostile_bodies_get_their_4xx_and_append_nothing(
    client: TestClient,
    tenant: Tenant,
    event_log: EventLog,
    scenario_id: str,
    op: apidoc.Operation,
) -> None:
    errors_before = server_errors()
    for case, body, changes, status, code in body_cases(op):
        position = event_log.position()
        headers = {**command_headers(tenant.writer), **changes}
        response = client.request(
            op.method, path_of(op, scenario_id), content=body, headers=headers
        )
        assert response.status_code == status, (case, response.text)
        assert_refused(response, status, code, event_log, position)
    assert server_errors() == errors_before


@pytest.mark.parametrize("op", COMMANDS)
def test_non_finite_and_huge_numbers_are_refused_and_append_nothing(
    client: TestClient,
    tenant: Tenant,
    event_log: EventLog,
    scenario_id: str,
    op: apidoc.Operation,
) -> None:
    body = valid_body(op, scenario_id)
    for where in NUMBER_FIELDS[op.operation_id]:
        for raw in NON_FINITE:
            position = event_log.position()
            response = client.request(
                op.method,
                path_of(op, scenario_id),
                content=with_raw(body, where, raw.encode()),
                headers=command_headers(tenant.writer),
            )
            assert response.status_code == 400, (where, raw, response.text)
            assert_refused(response, 400, "VALIDATION_ERROR", event_log, position)
    # The untouched body is accepted: the number alone was refused.
    accepted = client.request(
        op.method, path_of(op, scenario_id), json=body, headers=command_headers(tenant.writer)
    )
    assert accepted.status_code < 300, accepted.text


PAGING_VALUES = ("-1", "0", "100000", "abc", "1e2", "1.5", "", "%00", "٣", "9" * 40)


@pytest.mark.parametrize("op", PAGED)
def test_paging_values_out_of_range_are_refused_on_every_list(
    client: TestClient, tenant: Tenant, op: apidoc.Operation
) -> None:
    key = getattr(tenant, op.roles[-1])
    names = {p.name for p in op.params if p.where == "query"}
    queries = [f"limit={value}" for value in PAGING_VALUES]
    if "page" in names:
        queries += [f"page={value}" for value in ("0", "-1", "abc", "", "1.0")]
    for query in queries:
        response = read(client, key, f"{op.path}?{query}")
        assert response.status_code == 400, (query, response.text)
        error = response.json()["error"]
        assert error["code"] == "VALIDATION_ERROR", (query, error)
        assert error["requestId"] == response.headers["X-Request-Id"]


@pytest.fixture
def live(settings: Settings, event_log: EventLog) -> Iterator[TestClient]:
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        yield client


def tampered(cursor: str) -> list[str]:
    payload, mac = cursor.split(".")
    flip = {"A": "B"}.get(payload[5], "A")
    return [
        payload[:5] + flip + payload[6:] + "." + mac,  # payload changed, MAC kept
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),  # MAC changed
        payload + "." + mac[:-4],  # MAC truncated
        payload,  # no MAC
        payload + "." + mac + "." + mac,  # three parts
        "." + mac,
        payload + ".",
        ".",
        "A" * 2000 + "." + mac,  # over the length bound
        quote("é" * 10) + "." + mac,
        quote("!!!!") + "." + mac,
        "e30." + mac,  # base64 of "{}" with a stolen MAC
    ]


@pytest.mark.parametrize("op", CURSORED)
def test_forged_tampered_and_foreign_cursors_are_invalid_cursor(
    live: TestClient, tenant: Tenant, operator: Collaborators, op: apidoc.Operation
) -> None:
    for _ in range(3):
        created = live.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
        forecast = live.post(
            "/api/forecasts/generate",
            json={"scenarioId": created.json()["id"], "horizonMonths": 12, "paths": 100},
            headers=command_headers(tenant.writer),
        )
        assert forecast.status_code == 202, forecast.text
    settle(live, forecast)
    cursor = read(live, tenant.reader, f"{op.path}?limit=1").json()["nextCursor"]
    assert cursor
    other = make_tenant(operator, f"Other {uuid.uuid4().hex[:6]}")
    # The genuine cursor works, so what follows is refused for the change alone.
    assert read(live, tenant.reader, f"{op.path}?limit=1&cursor={cursor}").status_code == 200

    answers = [
        (forged, read(live, tenant.reader, f"{op.path}?cursor={quote(forged, safe='%')}"))
        for forged in tampered(cursor)
    ]
    answers.append(("foreign", read(live, other.reader, f"{op.path}?cursor={cursor}")))
    answers.append(("foreign-writer", read(live, other.writer, f"{op.path}?cursor={cursor}")))

    for case, response in answers:
        assert response.status_code == 400, (case, response.text)
        error = response.json()["error"]
        assert error["code"] == "INVALID_CURSOR", (case, error)
        assert error["requestId"] == response.headers["X-Request-Id"]


# The transport cases: a real server, a raw socket, so the client cannot tidy anything up.


@pytest.fixture
def server(settings: Settings, event_log: EventLog) -> Iterator[str]:
    with serving(create_app(settings, event_log=event_log)) as url:
        yield url


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def request_head(method: str, path: str, key: str, extra: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {key}",
        f"Idempotency-Key: {uuid.uuid4().hex}",
        "Content-Type: application/json",
        *(f"{name}: {value}" for name, value in extra.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (all the service sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    return int(status_line.split()[1]), headers, rest[:length]


def assert_envelope(status: int, headers: dict[str, str], body: bytes, code: str) -> None:
    error = json.loads(body)["error"]
    assert error["code"] == code, (status, error)
    assert error["requestId"] == headers["x-request-id"]


@pytest.mark.parametrize("op", COMMANDS)
def test_ten_mebibytes_declared_are_refused_before_they_are_sent(
    server: str, tenant: Tenant, event_log: EventLog, scenario_id: str, op: apidoc.Operation
) -> None:
    position = event_log.position()
    errors_before = server_errors()
    started = time.monotonic()
    with connect(server) as sock:
        head = request_head(
            op.method, path_of(op, scenario_id), tenant.writer, {"Content-Length": str(TEN_MIB)}
        )
        sock.sendall(head + b"{" + b" " * 65535)

        status, headers, body = read_response(sock)

    assert time.monotonic() - started < 5.0
    assert status == 413
    assert_envelope(status, headers, body, "PAYLOAD_TOO_LARGE")
    assert event_log.position() == position
    assert server_errors() == errors_before


@pytest.mark.parametrize("op", COMMANDS)
def test_ten_mebibytes_chunked_are_refused_while_streaming(
    server: str, tenant: Tenant, event_log: EventLog, scenario_id: str, op: apidoc.Operation
) -> None:
    position = event_log.position()
    errors_before = server_errors()
    chunk = b" " * (256 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with connect(server) as sock:
        head = request_head(
            op.method, path_of(op, scenario_id), tenant.writer, {"Transfer-Encoding": "chunked"}
        )
        sock.sendall(head)
        sent = 0
        try:
            while sent < TEN_MIB:
                sock.sendall(framed)
                sent += len(chunk)
                sock.settimeout(0.0)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server has answered
                except BlockingIOError:
                    pass
                finally:
                    sock.settimeout(10)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: the answer is waiting

        status, headers, body = read_response(sock)

    assert sent < TEN_MIB, "the server read all ten mebibytes before answering"
    assert status == 413
    assert_envelope(status, headers, body, "PAYLOAD_TOO_LARGE")
    assert event_log.position() == position
    assert server_errors() == errors_before


@pytest.mark.parametrize("op", COMMANDS)
def test_a_content_length_shorter_than_the_body_is_read_as_declared(
    server: str, tenant: Tenant, event_log: EventLog, scenario_id: str, op: apidoc.Operation
) -> None:
    """The server takes the declared bytes (a truncated JSON text: 400) and treats the rest
    as the next request, which is no valid request: never a 5xx, nothing appended. The
    httptools parser (production's) reads ahead and may meet the garbage first: uvicorn
    then answers its own plain 400 and closes, before our answer to the first request."""
    position = event_log.position()
    errors_before = server_errors()
    body = json.dumps(valid_body(op, scenario_id) or {"x": 1}).encode()
    with connect(server) as sock:
        head = request_head(op.method, path_of(op, scenario_id), tenant.writer, {
            "Content-Length": "1"
        })  # fmt: skip
        sock.sendall(head + body)

        status, headers, answer = read_response(sock)

    assert status == 400
    if answer != b"Invalid HTTP request received.":
        assert_envelope(status, headers, answer, "VALIDATION_ERROR")
    assert event_log.position() == position
    assert server_errors() == errors_before


@pytest.mark.parametrize("op", COMMANDS)
def test_a_content_length_longer_than_the_body_answers_nothing_and_appends_nothing(
    server: str, tenant: Tenant, event_log: EventLog, scenario_id: str, op: apidoc.Operation
) -> None:
    """The client declares more than it sends and stops sending: the server must not act
    on the partial body, nor count a 5xx for the client's disconnect."""
    position = event_log.position()
    errors_before = server_errors()
    finished_before = answered()
    body = json.dumps(valid_body(op, scenario_id)).encode()
    with connect(server) as sock:
        head = request_head(
            op.method, path_of(op, scenario_id), tenant.writer, {"Content-Length": "4096"}
        )
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        leftover = b""
        while chunk := sock.recv(65536):
            leftover += chunk

    if leftover:
        status = int(leftover.split(b" ", 2)[1])
        assert 400 <= status < 500, leftover
    # The server finishes the request after the socket closes; wait for that, bounded.
    deadline = time.monotonic() + 5
    while answered() == finished_before:
        assert time.monotonic() < deadline, "the server never finished the request"
        time.sleep(0.01)
    assert event_log.position() == position
    assert server_errors() == errors_before
