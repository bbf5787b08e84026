"""The `accubooks` command, run as a real process on both event-store backends: operator
commands print what API.md promises, their effects reach independent API processes
within the contract's 5 seconds, and `serve` answers where it listens."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx2
import pytest
from starlette.testclient import TestClient

from infra.settings import Settings
from service.app import create_app
from tests.conftest import command_headers, scenario_body

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 60.0
# API.md: "a revoked key stops working, within 5 seconds on every API process".
REVOCATION_DEADLINE_S = 5.0
UUID_TEXT = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def cli_env(settings: Settings) -> dict[str, str]:
    """The process environment naming the test's store, and nothing else of ours."""
    ours = ("ACCUBOOKS_", "DATABASE_URL", "REDIS_URL", "BROKER_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env["ACCUBOOKS_DATA_DIR"] = settings.data_dir
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    return env


def accubooks(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=PROJECT_ROOT,
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def accubooks_json(settings: Settings, *args: str) -> dict[str, Any]:
    done = accubooks(settings, *args, "--json")
    assert done.returncode == 0, done.stderr
    printed: dict[str, Any] = json.loads(done.stdout)
    return printed


def wait_until(condition: Callable[[], bool], *, timeout_s: float, pause_s: float = 0.05) -> bool:
    """Polls ``condition`` until it holds or the deadline passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause_s)


def authenticates(client: TestClient, key: str) -> int:
    """The status of a command that authenticates and then fails validation, so probing
    a key appends nothing: 400 while the key works, 401 once it does not."""
    response = client.post("/api/scenarios", json={}, headers=command_headers(key))
    assert response.status_code in (400, 401), response.text
    return response.status_code


@pytest.fixture
def tenant_id(settings: Settings) -> str:
    created = accubooks_json(settings, "tenants", "create", "Initech")
    return str(created["tenantId"])


def test_tenants_create_prints_the_new_tenant_as_json(settings: Settings) -> None:
    created = accubooks_json(settings, "tenants", "create", "Acme Ltd")

    assert set(created) == {"tenantId", "name"}
    assert created["name"] == "Acme Ltd"
    assert uuid.UUID(created["tenantId"])


def test_keys_issue_prints_the_key_once_and_it_works_on_the_api(
    settings: Settings, tenant_id: str
) -> None:
    issued = accubooks_json(settings, "keys", "issue", tenant_id, "--role", "writer")

    assert set(issued) == {"keyId", "tenantId", "role", "key"}
    assert issued["tenantId"] == tenant_id
    assert issued["role"] == "writer"
    assert uuid.UUID(issued["keyId"])
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(issued["key"])
        )
    assert response.status_code == 201, response.text


def test_keys_issue_gives_each_role_its_own_rights(settings: Settings, tenant_id: str) -> None:
    reader = accubooks_json(settings, "keys", "issue", tenant_id, "--role", "reader")

    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(reader["key"])
        )

    assert reader["role"] == "reader"
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "FORBIDDEN"


def test_revoked_key_is_refused_within_five_seconds_on_every_api_process(
    settings: Settings, tenant_id: str
) -> None:
    issued = accubooks_json(settings, "keys", "issue", tenant_id, "--role", "writer")
    key = issued["key"]
    # Two independent API processes, each with its own store connection and key cache.
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        # Both have just cached the key as valid: the revocation must outlive that.
        assert authenticates(first, key) == 400
        assert authenticates(second, key) == 400

        revoked = accubooks_json(settings, "keys", "revoke", issued["keyId"])
        revoked_at = time.monotonic()

        refused = wait_until(
            lambda: authenticates(first, key) == 401 and authenticates(second, key) == 401,
            timeout_s=REVOCATION_DEADLINE_S,
        )
        elapsed_s = time.monotonic() - revoked_at
        refusal = first.post("/api/scenarios", json={}, headers=command_headers(key))

    assert revoked == {"keyId": issued["keyId"], "revoked": True}
    assert refused, f"the revoked key still worked {elapsed_s:.1f}s after `keys revoke`"
    assert refusal.json()["error"]["code"] == "UNAUTHORIZED"


def test_text_output_is_readable_and_names_the_ids(settings: Settings) -> None:
    created = accubooks(settings, "tenants", "create", "Globex")
    assert created.returncode == 0, created.stderr
    [tenant_id] = re.findall(UUID_TEXT, created.stdout)
    assert "Globex" in created.stdout
    assert not created.stdout.lstrip().startswith("{")

    issued = accubooks(settings, "keys", "issue", tenant_id, "--role", "auditor")
    assert issued.returncode == 0, issued.stderr
    key_id = next(found for found in re.findall(UUID_TEXT, issued.stdout) if found != tenant_id)
    assert tenant_id in issued.stdout
    assert "auditor" in issued.stdout
    assert re.search(r"\babk_\S+", issued.stdout)

    revoked = accubooks(settings, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert key_id in revoked.stdout
    assert "revoked" in revoked.stdout


def test_keys_issue_for_an_unknown_tenant_fails_with_a_message(settings: Settings) -> None:
    unknown = str(uuid.uuid4())

    done = accubooks(settings, "keys", "issue", unknown, "--role", "writer", "--json")

    assert done.returncode == 1
    assert unknown in done.stderr
    assert done.stdout == ""


def test_keys_revoke_of_an_unknown_key_fails_with_a_message(settings: Settings) -> None:
    unknown = str(uuid.uuid4())

    done = accubooks(settings, "keys", "revoke", unknown, "--json")

    assert done.returncode == 1
    assert unknown in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--role", "admin"], id="unknown-role"),
        pytest.param([], id="no-role"),
    ],
)
def test_keys_issue_with_a_bad_role_is_a_usage_error(settings: Settings, args: list[str]) -> None:
    # Usage is checked before anything is looked up, so any tenant id will do.
    done = accubooks(settings, "keys", "issue", str(uuid.uuid4()), *args, "--json")

    assert done.returncode == 2
    assert "--role" in done.stderr
    assert done.stdout == ""


def test_keys_issue_with_a_malformed_tenant_id_is_a_usage_error(settings: Settings) -> None:
    done = accubooks(settings, "keys", "issue", "not-a-uuid", "--role", "writer")

    assert done.returncode == 2
    assert "not-a-uuid" in done.stderr


class LineReader:
    """A stream's lines, read on a thread so that the test can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, name="serve-stdout", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stream:
            self._lines.put(line)

    def next_line(self, *, timeout_s: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self, *, timeout_s: float) -> None:
        """Waits for the end of the stream (the process has exited), then closes it."""
        self._thread.join(timeout=timeout_s)
        self._stream.close()


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    """`accubooks serve --port 0 --json` as a real process; what its first line says and
    where its stderr goes. The process is always stopped afterwards."""
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--json"],
            cwd=PROJECT_ROOT,
            env=cli_env(settings),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    stdout = LineReader(process.stdout)
    try:
        first_line = stdout.next_line(timeout_s=COMMAND_TIMEOUT_S)
        assert first_line is not None, f"serve printed nothing; stderr: {stderr_path.read_text()}"
        yield json.loads(first_line), stderr_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=COMMAND_TIMEOUT_S)
        stdout.close(timeout_s=COMMAND_TIMEOUT_S)


def test_serve_prints_its_url_and_answers_health(
    served: tuple[dict[str, Any], Path],
) -> None:
    where, stderr_path = served

    assert re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*", where["url"]), where
    response = httpx2.get(f"{where['url']}/health/live", timeout=COMMAND_TIMEOUT_S)
    assert response.status_code == 200, stderr_path.read_text()
    assert response.json() == {"status": "ok"}
