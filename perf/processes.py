"""The processes a benchmark starts: `accubooks` commands (long-running and one-shot), a
private redis-server, the bare hello server. Each is started on 127.0.0.1 (a free port),
waited on until it answers, and always stopped when its `with` block ends."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx2 as httpx
import msgspec
import redis

from perf.harness import REQUEST_TIMEOUT_S, ROOT, Deadline

POLL_S = 0.05  # how often a readiness check is repeated
STOP_S = 10.0  # how long a process gets to exit after SIGTERM, before SIGKILL
START_S = 60.0  # the longest an `accubooks` process or command may take to answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def stop(proc: subprocess.Popen[Any], *, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL with ``kill``), then SIGKILL if it has not exited in STOP_S."""
    if proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_S)


def wait_until(check: Callable[[], bool], what: str, deadline: Deadline, limit_s: float) -> None:
    """Polls ``check`` until it is true, at most ``limit_s`` (and the budget)."""
    until = time.monotonic() + min(limit_s, deadline.remaining())
    while not check():
        if time.monotonic() > until:
            raise SystemExit(f"{what} did not happen in time")
        time.sleep(POLL_S)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `with` block that started a process
    stops it."""

    def raise_exit(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_exit)


# --- accubooks --------------------------------------------------------------------------


@dataclass
class Process:
    """A running `accubooks <name> --json`; its stderr goes to a temporary file."""

    name: str
    proc: subprocess.Popen[str]
    stderr: IO[str]

    def first_line(self, deadline: Deadline) -> dict[str, Any]:
        """The JSON line it prints once started (where it listens, what it runs)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], min(START_S, deadline.remaining()))
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stderr.seek(0)
            raise SystemExit(f"accubooks {self.name} did not start: {self.stderr.read()[-2000:]}")
        first: dict[str, Any] = msgspec.json.decode(line)
        return first


def _accubooks_env(database_url: str, extra_env: dict[str, str] | None) -> dict[str, str]:
    # None of the caller's service settings leak in: only what the benchmark passes counts.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ACCUBOOKS_") and k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL")
    }
    env["DATABASE_URL"] = database_url
    env.update(extra_env or {})
    return env


@contextmanager
def accubooks(
    args: list[str], database_url: str, extra_env: dict[str, str] | None = None
) -> Iterator[Process]:
    """`accubooks <args> --json` as a process on the benchmark database; always stopped."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args, "--json"],
            cwd=ROOT,
            env=_accubooks_env(database_url, extra_env),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            yield Process(args[0], proc, stderr)
        finally:
            stop(proc)
            assert proc.stdout is not None
            proc.stdout.close()


def accubooks_json(args: list[str], database_url: str, deadline: Deadline) -> dict[str, Any]:
    """`accubooks <args> --json` run to its end on the benchmark database (e.g. creating a
    tenant or issuing a key): its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--json"],
        cwd=ROOT,
        env=_accubooks_env(database_url, None),
        capture_output=True,
        text=True,
        timeout=min(START_S, deadline.remaining()),
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"accubooks {' '.join(args)} failed: {done.stderr.strip()}")
    answer: dict[str, Any] = msgspec.json.decode(done.stdout.splitlines()[0])
    return answer


@contextmanager
def api_process(
    database_url: str, env: dict[str, str], deadline: Deadline, *, workers: int = 1
) -> Iterator[tuple[str, int]]:
    """`accubooks api` on a free port with ``env`` and ``workers`` processes (their
    metrics added up in a private PROMETHEUS_MULTIPROC_DIR), answering: its URL and pid
    (the workers' parent); always stopped."""
    args = ["api", "--host", "127.0.0.1", "--port", "0", "--workers", str(workers)]
    with ExitStack() as stack:
        if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in env:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="api_metrics_"))
            env = {**env, "PROMETHEUS_MULTIPROC_DIR": directory}
        proc = stack.enter_context(accubooks(args, database_url, env))
        url = str(proc.first_line(deadline)["url"])
        httpx.get(url + "/health/live", timeout=REQUEST_TIMEOUT_S, trust_env=False)
        yield url, proc.proc.pid


# --- the edge (deploy/haproxy.cfg) -------------------------------------------------------

EDGE_CONFIG = ROOT / "deploy" / "haproxy.cfg"


@dataclass(frozen=True)
class Edge:
    url: str  # where clients connect
    stats_url: str  # its own /metrics and /stats
    pid: int


@contextmanager
def edge_proxy(
    api_url: str, deadline: Deadline, *, max_in_flight: int, queue: int
) -> Iterator[Edge]:
    """haproxy with deploy/haproxy.cfg in front of ``api_url``, on free ports, answering;
    always stopped."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise SystemExit("haproxy is missing: apt-get install -y haproxy")
    port, stats_port = free_port(), free_port()
    env = {
        **os.environ,
        "ACCUBOOKS_EDGE_BIND": f"127.0.0.1:{port}",
        "ACCUBOOKS_EDGE_STATS_BIND": f"127.0.0.1:{stats_port}",
        "ACCUBOOKS_API_ADDR": api_url.removeprefix("http://"),
        "ACCUBOOKS_EDGE_MAX_IN_FLIGHT": str(max_in_flight),
        "ACCUBOOKS_EDGE_QUEUE": str(queue),
    }
    # -db: in the foreground, so that it is this child and stop() ends it.
    proc = subprocess.Popen([binary, "-db", "-f", str(EDGE_CONFIG)], env=env)
    edge = Edge(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}", proc.pid)
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"haproxy exited with {proc.returncode}")
            try:
                return httpx.get(edge.stats_url + "/stats", timeout=1, trust_env=False).is_success
            except httpx.HTTPError:
                return False

        wait_until(answers, "the edge answering", deadline, 20.0)
        yield edge
    finally:
        stop(proc)


# --- redis-server -----------------------------------------------------------------------


@dataclass
class RedisServer:
    url: str
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would."""
        stop(self.proc, kill=True)


@contextmanager
def private_redis(directory: str, deadline: Deadline) -> Iterator[RedisServer]:
    """A redis-server of our own on a free port, no persistence, its log in ``directory``;
    always stopped."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: apt-get install -y redis-server")
    port = free_port()
    if port == 6379:  # the shared server's port: never ours
        port = free_port()
    with open(Path(directory) / "redis.log", "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", proc)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

        def answers() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"redis-server exited: see {directory}/redis.log")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, "the private redis-server answering", deadline, 20.0)
        client.close()
        yield server
    finally:
        stop(proc)


# --- the hello baseline -----------------------------------------------------------------


@contextmanager
def hello_server(deadline: Deadline, *, workers: int = 1) -> Iterator[tuple[str, int]]:
    """perf.hello served the way `accubooks api` serves (service.draining.serve: uvicorn's
    protocol with httptools on uvloop, ``workers`` processes). Its URL and pid (the parent
    of the workers when there are several); always stopped."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "perf.hello", "--port", "0", "--workers", str(workers)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], min(START_S, deadline.remaining()))
            line = proc.stdout.readline() if ready else ""
            if not line:
                stderr.seek(0)
                raise SystemExit(f"the hello server did not start: {stderr.read()[-2000:]}")
            url = str(msgspec.json.decode(line)["url"])

            def answers() -> bool:
                try:
                    return httpx.get(url + "/", timeout=1.0, trust_env=False).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(answers, "the hello server answering", deadline, 30.0)
            yield url, proc.pid
        finally:
            stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()


# --- what a server process (and its workers) use -----------------------------------------


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (a server's worker processes), from /proc."""
    found = [pid]
    for parent in found:
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            for task in tasks:
                children = (task / "children").read_text().split()
                found.extend(int(c) for c in children if int(c) not in found)
        except OSError:
            continue
    return found


def rss_bytes(pids: list[int]) -> int:
    """The resident memory of these processes, added up (VmRSS)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class PeakRss:
    """Samples the resident memory of a process and its workers (each, and added up)
    every ``every_s`` in a thread, between start() and stop()."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self._pid = pid
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.total_bytes = 0
        self.per_process_bytes = 0

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> PeakRss:
        self._stop.set()
        self._thread.join()
        return self

    def _sample(self) -> None:
        while True:
            pids = family(self._pid)
            self.total_bytes = max(self.total_bytes, rss_bytes(pids))
            largest = max(rss_bytes([p]) for p in pids)
            self.per_process_bytes = max(self.per_process_bytes, largest)
            if self._stop.wait(self._every_s):
                return
