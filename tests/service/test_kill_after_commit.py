"""Case 5 of the reliability suite: the API process is SIGKILLed while commands are in
flight, so some are committed whose answers never left the process (Jepsen's "acknowledged
or not, nothing lost, nothing doubled"). The clients retry every command that got no
answer, with the same Idempotency-Key and body, on a fresh process; then:

- every command exists exactly once in the log (one Scenario.Created per key), whether
  its first try was acknowledged, committed unanswered, or never committed;
- every acknowledged command's retry answers its first answer byte for byte, marked
  `Idempotent-Replayed: true`;
- a retry of a command committed before the kill but never answered gets the stored
  answer too (counted; the kill lands mid-flight, so most runs see some).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from commands.context import Collaborators
from infra.eventstore import EventLog
from infra.settings import Settings
from tests.conftest import make_tenant, scenario_body
from tests.service.processes import ApiProcess, api_process

CLIENTS = 32
COMMANDS = 400
KILL_AFTER_ACKS = 40  # acknowledged commands before the SIGKILL
HTTP_TIMEOUT_S = 20.0
ROUND_BOUND_S = 120.0


@dataclass
class Attempt:
    key: str
    body: bytes
    status: int | None = None  # None: no answer (the process died, or never reached)
    answer: bytes = b""


def send(http: httpx2.Client, writer: str, attempt: Attempt) -> httpx2.Response:
    return http.post(
        "/api/scenarios",
        content=attempt.body,
        headers={
            "Authorization": f"Bearer {writer}",
            "Content-Type": "application/json",
            "Idempotency-Key": attempt.key,
        },
    )


def load_until_killed(running: ApiProcess, writer: str, attempts: list[Attempt]) -> None:
    """CLIENTS threads send the commands; the process is SIGKILLed once KILL_AFTER_ACKS
    have been acknowledged. Every attempt records its answer, or none."""
    acknowledged = 0
    lock = threading.Lock()
    killed = threading.Event()

    def one(attempt: Attempt, http: httpx2.Client) -> None:
        nonlocal acknowledged
        if killed.is_set():
            return
        try:
            response = send(http, writer, attempt)
        except httpx2.TransportError:
            return  # no answer: the process is gone
        attempt.status, attempt.answer = response.status_code, response.content
        with lock:
            acknowledged += response.status_code == 201
            if acknowledged >= KILL_AFTER_ACKS and not killed.is_set():
                killed.set()
                os.kill(running.pid, signal.SIGKILL)

    clients = [httpx2.Client(base_url=running.url, timeout=HTTP_TIMEOUT_S) for _ in range(CLIENTS)]
    try:
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            futures = [
                pool.submit(one, attempt, clients[i % CLIENTS])
                for i, attempt in enumerate(attempts)
            ]
            for future in futures:
                future.result(timeout=ROUND_BOUND_S)
    finally:
        for client in clients:
            client.close()
    assert killed.is_set(), "every command was answered before the kill"
    running.process.wait(timeout=ROUND_BOUND_S)


def created_names(log: EventLog) -> Counter[str]:
    """How many Scenario.Created events the log holds per scenario name."""
    names: Counter[str] = Counter()
    position = 0
    while True:
        page = log.recorder.select_notifications(position + 1, 1000)
        if not page:
            return names
        for notification in page:
            if notification.topic == "accubooks:Scenario.Created":
                names[json.loads(notification.state)["name"]] += 1
        position = page[-1].id


@pytest.mark.timeout(600)
def test_commands_in_flight_at_a_sigkill_are_each_applied_once_and_retries_answer_them(
    settings: Settings, event_log: EventLog, operator: Collaborators, tmp_path: Path
) -> None:
    writer = make_tenant(operator).writer
    attempts = [
        Attempt(key=uuid.uuid4().hex, body=json.dumps(scenario_body(name=f"kill {i}")).encode())
        for i in range(COMMANDS)
    ]
    env = {"ACCUBOOKS_LOG_LEVEL": "WARNING"}
    with api_process(settings, tmp_path / "killed.log", env) as running:
        load_until_killed(running, writer, attempts)
    answered = [a for a in attempts if a.status is not None]
    unanswered = [a for a in attempts if a.status is None]
    assert all(a.status == 201 for a in answered), Counter(a.status for a in answered)
    assert unanswered, "the kill left nothing in flight"

    committed_unanswered = 0
    started = time.monotonic()
    with (
        api_process(settings, tmp_path / "retries.log", env) as again,
        httpx2.Client(base_url=again.url, timeout=HTTP_TIMEOUT_S) as http,
    ):
        for attempt in attempts:
            assert time.monotonic() - started < ROUND_BOUND_S, "the retries took too long"
            retry = send(http, writer, attempt)
            assert retry.status_code == 201, retry.text
            replayed = retry.headers.get("Idempotent-Replayed") == "true"
            if attempt.status is not None:
                assert replayed, attempt.key
                assert retry.content == attempt.answer, attempt.key
            elif replayed:
                committed_unanswered += 1

    names = created_names(event_log)
    expected = {json.loads(a.body)["name"] for a in attempts}
    assert set(names) == expected
    doubled = {name: n for name, n in names.items() if n != 1}
    assert not doubled, doubled
    print(
        f"SIGKILL mid-flight: {len(answered)} acknowledged, {len(unanswered)} unanswered "
        f"({committed_unanswered} of them committed before the kill, answered by the stored "
        f"receipt on retry); {len(names)} scenarios in the log, each once"
    )
