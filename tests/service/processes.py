"""Real `accubooks api` processes for tests: started on a free port with the test's store
in their environment, their stderr (the JSON log) kept in a file, always stopped."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from infra.settings import Settings
from tests.service.test_cli import PROJECT_ROOT, cli_env

# The bound of a process starting or stopping: a hung process fails the test.
PROCESS_DEADLINE_S = 60.0


@dataclass(frozen=True)
class ApiProcess:
    url: str
    pid: int
    log_path: Path
    # For tests that signal it and read its exit status.
    process: subprocess.Popen[str]

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0


@contextmanager
def api_process(
    settings: Settings,
    log_path: Path,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[ApiProcess]:
    """`accubooks api --port 0 --json` (and ``extra_args``); yields once it listens. Its
    stderr goes to ``log_path``, which is complete once the context has exited (the
    process stopped)."""
    env = {**cli_env(settings), **(extra_env or {})}
    command = ["-m", "service.cli", "api", "--host", "127.0.0.1", "--port", "0", "--json"]
    command += extra_args
    with log_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, *command],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], PROCESS_DEADLINE_S)
        assert ready, f"`accubooks api` printed nothing: {log_path.read_text()[-3000:]}"
        line = process.stdout.readline()
        assert line, f"`accubooks api` exited ({process.poll()}): {log_path.read_text()[-3000:]}"
        yield ApiProcess(
            url=json.loads(line)["url"], pid=process.pid, log_path=log_path, process=process
        )
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=PROCESS_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=PROCESS_DEADLINE_S)
        process.stdout.close()
