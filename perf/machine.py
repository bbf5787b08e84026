"""Facts about the machine and its tools that a report quotes beside its figures: the CPU,
the versions of PostgreSQL and of command-line tools, what uvicorn runs on."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
from pathlib import Path

import psycopg


def postgres_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def tool_version(command: list[str]) -> str:
    """The first line a tool prints for ``command`` (e.g. ``["wrk", "--version"]``)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (
        (done.stdout or done.stderr).splitlines()[0].strip() if done.stdout or done.stderr else "?"
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def uvicorn_loop_http() -> str:
    """What uvicorn's "auto" picks here: uvloop and httptools when installed."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    loop = "uvloop" if have["uvloop"] else "asyncio"
    http = "httptools" if have["httptools"] else "h11"
    return f"{loop} loop, {http}"
