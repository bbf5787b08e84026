"""SIGTERM during in-flight requests (case 16), on a real `accubooks api` process: from the
signal /health/ready answers 503 SERVICE_UNAVAILABLE while /health/live and the routes go
on answering; once the draining phase is over new connections are refused, the requests
in flight (a command whose body is still arriving, a read-your-writes read waiting on its
token) finish with their normal answers, and the process exits 0 within a bound. The
command is applied exactly once, all of it: a fresh process replays its stored answer and
the log holds the aggregate's one event."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from commands.context import Collaborators
from infra.settings import Settings
from tests.conftest import Tenant, make_tenant, scenario_body
from tests.service.processes import ApiProcess, api_process

DRAIN_S = 1.0
# The waiting read's budget: longer than the draining phase, so it is still in flight
# when the listener closes.
READ_YOUR_WRITES_S = 3.0
# A position in the log (the tenant's creation) that no read model reaches, since no
# projection worker runs in this test: the read waits for its whole budget. (A token
# beyond the log's head would be refused at once.)
UNREACHED_TOKEN = "1"
# From the signal to the exit: draining, the longest request in flight, the lifespan's
# shutdown, with room for a slow machine.
EXIT_BOUND_S = DRAIN_S + READ_YOUR_WRITES_S + 5.0
HTTP_TIMEOUT_S = 10.0
POLL_S = 0.05


@contextmanager
def api(settings: Settings, log_path: Path, **env: str) -> Iterator[ApiProcess]:
    """`accubooks api`, quiet (no access lines), its Popen kept for its exit status."""
    with api_process(settings, log_path, {"ACCUBOOKS_LOG_LEVEL": "WARNING", **env}) as running:
        yield running


class SlowCommand:
    """POST /api/scenarios over a raw socket: the headers and half the body now, the rest
    when the test says, so the request is in flight across the signal."""

    def __init__(self, running: ApiProcess, tenant: Tenant, idempotency_key: str) -> None:
        self.body = json.dumps(scenario_body(name="Created across a SIGTERM")).encode()
        self.sock = socket.create_connection((running.host, running.port), timeout=HTTP_TIMEOUT_S)
        head = (
            "POST /api/scenarios HTTP/1.1\r\n"
            f"Host: {running.host}:{running.port}\r\n"
            f"Authorization: Bearer {tenant.writer}\r\n"
            "Content-Type: application/json\r\n"
            f"Idempotency-Key: {idempotency_key}\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + self.body[: len(self.body) // 2])

    def finish(self) -> tuple[int, dict[str, str], bytes]:
        """Sends the rest of the body; the status, headers and body of the answer (read
        until the server closes the connection, as it does while shutting down)."""
        self.sock.sendall(self.body[len(self.body) // 2 :])
        received = b""
        while chunk := self.sock.recv(65536):
            received += chunk
        self.sock.close()
        head, _, body = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        return int(status_line.split()[1]), headers, body


@dataclass
class WaitingRead:
    """A read sent with a token the log will not reach, in a thread of its own."""

    url: str
    tenant: Tenant
    response: httpx2.Response | None = None
    ended_at: float = 0.0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="waiting-read")
        self.thread.start()

    def _run(self) -> None:
        with httpx2.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S) as http:
            self.response = http.get(
                "/api/dashboard",
                headers={
                    "Authorization": f"Bearer {self.tenant.reader}",
                    "X-Consistency-Token": UNREACHED_TOKEN,
                },
            )
        self.ended_at = time.monotonic()


def _probe(url: str, path: str, key: str | None = None) -> httpx2.Response | None:
    """One request on a new connection; None when the connection is refused, or reset or
    closed before any byte of an answer: a connection the kernel had queued for the
    listener when it closed is reset, not served (no answer at all, never half of one)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx2.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
            return http.get(path, headers=headers)
    except (httpx2.ConnectError, httpx2.ReadError, httpx2.RemoteProtocolError):
        return None


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
def test_sigterm_drains_finishes_requests_in_flight_and_exits_0(
    settings: Settings, operator: Collaborators, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tenant = make_tenant(operator)
    idempotency_key = uuid.uuid4().hex
    env = {
        "ACCUBOOKS_SHUTDOWN_DRAIN_S": str(DRAIN_S),
        "ACCUBOOKS_READ_YOUR_WRITES_TIMEOUT_S": str(READ_YOUR_WRITES_S),
    }
    with api(settings, tmp_path / "first.log", **env) as running:
        ready = _probe(running.url, "/health/ready")
        assert ready is not None and ready.status_code == 200, ready

        command = SlowCommand(running, tenant, idempotency_key)
        # Closed even when the test fails before finishing it (else a later test meets
        # its ResourceWarning).
        request.addfinalizer(command.sock.close)
        read = WaitingRead(running.url, tenant)
        signalled_at = time.monotonic()
        os.kill(running.process.pid, signal.SIGTERM)

        # Draining: not ready, still alive and serving, until the listener closes.
        readiness: list[httpx2.Response] = []
        served_while_draining = 0
        while True:
            assert time.monotonic() - signalled_at < EXIT_BOUND_S, "the listener never closed"
            probe = _probe(running.url, "/health/ready")
            if probe is None:
                break
            readiness.append(probe)
            live = _probe(running.url, "/health/live")
            dashboard = _probe(running.url, "/api/dashboard", tenant.reader)
            if live is None or dashboard is None:
                break
            assert live.status_code == 200, live.text
            assert dashboard.status_code == 200, dashboard.text
            served_while_draining += 1
            time.sleep(POLL_S)
        closed_at = time.monotonic()
        assert readiness, "nothing was asked while draining"
        for answer in readiness:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "SERVICE_UNAVAILABLE", answer.text
            assert answer.headers.get("Retry-After"), answer.headers
        assert closed_at - signalled_at >= DRAIN_S * 0.9, closed_at - signalled_at
        # Refused from now on (the listener is closed), never a half answer.
        assert _probe(running.url, "/health/live") is None

        # In flight across the signal and the listener's closing: normal answers.
        status, headers, body = command.finish()
        assert status == 201, body
        assert int(headers["content-length"]) == len(body), headers
        created = json.loads(body)
        read.thread.join(timeout=HTTP_TIMEOUT_S)
        assert read.response is not None, "the waiting read got no answer"
        assert read.response.status_code == 503, read.response.text
        error = read.response.json()["error"]
        assert error["code"] == "OPERATION_TIMEOUT", error
        assert error["operation"] == "read_your_writes", error
        assert read.ended_at > closed_at, "the read was meant to outlive the listener"

        returncode = running.process.wait(timeout=EXIT_BOUND_S)
        exited_after = time.monotonic() - signalled_at
        print(
            f"SIGTERM: {len(readiness)} readiness answers 503 and {served_while_draining} reads"
            f" served while draining; listener closed after {closed_at - signalled_at:.2f} s;"
            f" command 201, waiting read 503 OPERATION_TIMEOUT after"
            f" {read.ended_at - signalled_at:.2f} s; exit {returncode} after {exited_after:.2f} s"
        )
        assert returncode == 0, (running.process.stderr, (tmp_path / "first.log").read_text())
        assert exited_after < EXIT_BOUND_S

    # Applied once and whole: the same command on a fresh process is the stored answer.
    with (
        api(settings, tmp_path / "second.log") as again,
        httpx2.Client(base_url=again.url, timeout=HTTP_TIMEOUT_S) as http,
    ):
        replayed = http.post(
            "/api/scenarios",
            content=command.body,
            headers={
                "Authorization": f"Bearer {tenant.writer}",
                "Content-Type": "application/json",
                "Idempotency-Key": idempotency_key,
            },
        )
        assert replayed.status_code == 201, replayed.text
        assert replayed.headers.get("Idempotent-Replayed") == "true", replayed.headers
        assert replayed.content == body
    # Straight from the log: the scenario's history is its one event.
    notifications = operator.log.recorder.select_notifications(start=1, limit=100_000)
    ours = [n for n in notifications if n.originator_id == uuid.UUID(created["id"])]
    assert [n.originator_version for n in ours] == [1], ours
