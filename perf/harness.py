"""What every benchmark here shares: a global time budget, a private PostgreSQL database
created and dropped around a run, the git revision a report was measured on, and writing
the report."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psycopg

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "perf" / "reports"
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# A per-request timeout far above any healthy latency: a stuck request fails, never hangs.
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Deadline:
    """The global time budget; every wait and loop of a run is bounded by it."""

    at: float

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at


@contextmanager
def postgres_database(admin_url: str = ADMIN_URL) -> Iterator[str]:
    """A fresh database perf_<random>, dropped (with its connections) afterwards."""
    name = f"perf_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    params["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def git_head() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    return git("rev-parse", "HEAD") + (
        " (uncommitted changes)" if git("status", "--porcelain") else ""
    )


def write_report(name: str, markdown: str, report: msgspec.Struct) -> None:
    """perf/reports/<name>.md and <name>.json (indented), each replaced whole: a run that
    dies while writing never leaves half a report."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    _replace(REPORTS / f"{name}.md", markdown.encode())
    _replace(REPORTS / f"{name}.json", msgspec.json.format(msgspec.json.encode(report)) + b"\n")


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
