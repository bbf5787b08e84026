"""Real faults for tests, no mocks: a private redis-server a test may kill and restart on
the same port, and a TCP proxy whose link can be slowed, black-holed, reset or fed garbage
while traffic flows."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from tests.services import unavailable

LOCALHOST = "127.0.0.1"
# Starting or killing a local process takes milliseconds; these deadlines only trip when
# something is really wrong, and then fail the test instead of hanging it.
PROCESS_DEADLINE_S = 10.0
POLL_S = 0.01
# The brief's bound: a proxy's thread is gone within this long of leaving its block.
PROXY_STOP_S = 1.0
# Bytes held for a peer (delayed, or not yet written) beyond which the sender's socket is
# no longer read, so a slowed link pushes back instead of buffering without bound.
PROXY_HELD_BYTES_MAX = 1 << 20


def free_port() -> int:
    """A port nothing listens on right now (another process may still take it)."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class PortTakenError(RuntimeError):
    """Raised when redis-server cannot bind its port because another process holds it."""


class PrivateRedis:
    """A redis-server of the test's own: no persistence, loopback only, never port 6379."""

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self._binary = binary
        self._directory = directory
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server on this object's port; return once it answers PING."""
        if self._process is not None:
            raise RuntimeError("redis-server is already running")
        log_path = self._directory / "redis.log"
        command = [
            self._binary,
            *("--port", str(self.port), "--bind", LOCALHOST),
            *("--save", "", "--appendonly", "no", "--dir", str(self._directory)),
            *("--daemonize", "no", "--logfile", ""),
        ]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._process = process
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not _answers_ping(self.port):
            if time.monotonic() > deadline:
                self.stop()
                output = log_path.read_text(errors="replace")
                raise RuntimeError(f"redis-server did not answer in time:\n{output}")
            try:
                process.wait(timeout=POLL_S)  # the poll interval, cut short if it dies
            except subprocess.TimeoutExpired:
                continue
            self._process = None
            output = log_path.read_text(errors="replace")
            if "Address already in use" in output:
                raise PortTakenError(f"port {self.port} is taken")
            raise RuntimeError(f"redis-server exited with {process.returncode}:\n{output}")

    def stop(self) -> None:
        """SIGKILL the server (no shutdown, no save); return once its port refuses."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait(timeout=PROCESS_DEADLINE_S)
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not _refuses(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still accepts after redis-server died")
            time.sleep(POLL_S)


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server on a free loopback port, killed on exit whatever happened."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("Redis", FileNotFoundError("redis-server is not on PATH"))
        return  # unavailable() skips or fails: it never returns
    with tempfile.TemporaryDirectory(prefix="private-redis-") as directory:
        server = PrivateRedis(binary, Path(directory), free_port())
        try:
            # free_port() races with other processes; a lost race costs a new port.
            for attempt in range(3):
                try:
                    server.start()
                    break
                except PortTakenError:
                    if attempt == 2:
                        raise
                    server.port = free_port()
            yield server
        finally:
            server.stop()


Mode = Literal["forward", "delay", "blackhole", "reset", "garbage"]


@dataclass(frozen=True, kw_only=True)
class _Fault:
    mode: Mode = "forward"
    delay_s: float = 0.0
    garbage: bytes = b""


def _reset(transport: asyncio.Transport) -> None:
    """Close with RST, not FIN: SO_LINGER with a zero timeout makes close() abort."""
    sock = transport.get_extra_info("socket")
    # A socket already closed has nothing left to reset.
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _End(asyncio.Protocol):
    """One socket of a proxied connection. What it receives goes to its peer's outbox,
    stamped with the time it may leave; the outbox is written in order as chunks fall due."""

    def __init__(self, relay: _Relay, *, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.peer: _End | None = None
        self.transport: asyncio.Transport | None = None
        self.outbox: deque[tuple[float, bytes]] = deque()
        self.outbox_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.closed = False
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.closed:  # reset while the connect was in flight
            _reset(transport)
            return
        self.relay.opened(self)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.relay.received(self, data)

    def eof_received(self) -> bool:
        # A half-closed connection is closed: the peer gets what is in flight, then FIN.
        if self.peer is not None:
            self.peer.closing = True
            self.peer.flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.ends.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.outbox.clear()
        peer = self.peer
        if peer is None or peer.closed:
            return
        if exc is not None:
            peer.reset()  # an abrupt end travels on as an abrupt end
        else:
            peer.closing = True
            peer.flush()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.regulate()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.regulate()

    def send(self, due: float, data: bytes) -> None:
        self.outbox.append((due, data))
        self.outbox_bytes += len(data)
        self.flush()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        now = self.relay.loop.time()
        while self.outbox and self.outbox[0][0] <= now:
            _, data = self.outbox.popleft()
            self.outbox_bytes -= len(data)
            # A black hole swallows the bytes still in flight as well as new ones.
            if self.relay.fault.mode != "blackhole":
                # Counted first: the reader may look at the counts once it has the bytes.
                self.relay.forwarded(self, len(data))
                transport.write(data)
        if self.outbox:
            if self.timer is None:
                self.timer = self.relay.loop.call_at(self.outbox[0][0], self._fall_due)
        elif self.closing:
            transport.close()
        self.regulate()

    def regulate(self) -> None:
        """Stop reading the peer while too much is held for this end; read again after."""
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return
        held = self.outbox_bytes > PROXY_HELD_BYTES_MAX or self.write_paused
        if held and not peer.read_paused:
            peer.read_paused = True
            peer.transport.pause_reading()
        elif not held and peer.read_paused:
            peer.read_paused = False
            peer.transport.resume_reading()

    def reset(self) -> None:
        self.closed = True
        self.outbox.clear()
        if self.transport is not None:
            _reset(self.transport)

    def close_now(self) -> None:
        self.closed = True
        self.outbox.clear()
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _fall_due(self) -> None:
        self.timer = None
        self.flush()


class _Relay:
    """The proxy's state inside its event loop: the fault in force, live sockets, counts."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.loop = asyncio.get_running_loop()
        self.fault = _Fault()
        self.ends: set[_End] = set()
        self.connects: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.connections_accepted = 0
        self.bytes_from_clients = 0
        self.bytes_from_target = 0
        self.bytes_to_target = 0
        self.bytes_to_clients = 0

    def accept(self) -> _End:
        return _End(self, is_client=True)

    def opened(self, end: _End) -> None:
        self.ends.add(end)
        if self.stopping:
            end.reset()
            return
        if not end.is_client:
            return
        self.connections_accepted += 1
        mode = self.fault.mode
        if mode == "reset":
            end.reset()
        elif mode != "blackhole":  # a connection born in a black hole never gets a target
            target = _End(self, is_client=False)
            end.peer, target.peer = target, end
            connect = self.loop.create_task(self._connect(target))
            self.connects.add(connect)
            connect.add_done_callback(self.connects.discard)

    async def _connect(self, target: _End) -> None:
        try:
            await self.loop.create_connection(lambda: target, self.target_host, self.target_port)
        except OSError:
            # The target refused or is unreachable: the client sees its connection reset.
            target.closed = True
            if target.peer is not None:
                target.peer.reset()

    def received(self, end: _End, data: bytes) -> None:
        if end.is_client:
            self.bytes_from_clients += len(data)
        else:
            self.bytes_from_target += len(data)
        fault = self.fault
        if end.peer is None or fault.mode in ("blackhole", "reset"):
            return
        if fault.mode == "garbage" and not end.is_client:
            data = fault.garbage
        due = self.loop.time() + (fault.delay_s if fault.mode == "delay" else 0.0)
        end.peer.send(due, data)

    def forwarded(self, end: _End, size: int) -> None:
        if end.is_client:
            self.bytes_to_clients += size
        else:
            self.bytes_to_target += size

    def set_fault(self, fault: _Fault) -> None:
        self.fault = fault
        if fault.mode == "reset":
            for end in list(self.ends):
                end.reset()

    async def serve(self, ready: concurrent.futures.Future[int], stop: asyncio.Event) -> None:
        try:
            server = await self.loop.create_server(self.accept, LOCALHOST, 0)
        except OSError as e:
            ready.set_exception(e)
            return
        ready.set_result(server.sockets[0].getsockname()[1])
        try:
            await stop.wait()
        finally:
            self.stopping = True
            server.close()
            # Sockets close in callbacks the loop runs next, and a connection accepted just
            # before close() may still arrive: go round until nothing is left.
            deadline = self.loop.time() + PROXY_STOP_S / 2
            while (self.ends or self.connects) and self.loop.time() < deadline:
                for connect in list(self.connects):
                    connect.cancel()
                for end in list(self.ends):
                    end.close_now()
                await asyncio.sleep(0)
            await server.wait_closed()


class TcpProxy:
    """A TCP proxy on a free loopback port in front of ``target_host:target_port``.

    It runs its own event loop in a thread, so it never blocks the test's loop. The fault
    can be changed from the test's thread while traffic flows; each change is in force
    when its method returns."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = LOCALHOST
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: _Relay | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"tcp-proxy-{target_host}:{target_port}", daemon=True
        )
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.port = self._ready.result(timeout=PROCESS_DEADLINE_S)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=PROXY_STOP_S)
        if self._thread.is_alive():
            raise RuntimeError(f"the proxy did not stop within {PROXY_STOP_S} s")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            if not self._ready.done():
                self._ready.set_exception(e)
            raise

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._relay = _Relay(self.target_host, self.target_port)
        await self._relay.serve(self._ready, self._stop)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def url_for(self, url: str) -> str:
        """``url`` (redis:// or postgresql://) with its host and port replaced by the
        proxy's; user, password, path and query are kept."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "postgresql", "postgres"):
            raise ValueError(f"not a redis:// or postgresql:// URL: {url!r}")
        user, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{user}{at}{self.host}:{self.port}"))

    @property
    def mode(self) -> Mode:
        return self._relay_now().fault.mode

    def forward(self) -> None:
        """Pass bytes through untouched (the mode a proxy starts in)."""
        self._set(_Fault(mode="forward"))

    def delay(self, seconds: float) -> None:
        """Hold every chunk, in both directions, ``seconds`` before sending it on."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self._set(_Fault(mode="delay", delay_s=seconds))

    def blackhole(self) -> None:
        """Accept and read, forward nothing either way, close nothing. What is swallowed is
        gone for good, and a connection accepted meanwhile never reaches the target."""
        self._set(_Fault(mode="blackhole"))

    def reset(self) -> None:
        """Reset (RST) every open connection; new ones are reset too until the mode
        changes."""
        self._set(_Fault(mode="reset"))

    def garbage(self, data: bytes) -> None:
        """Replace every chunk from the target with ``data``; clients' bytes pass."""
        if not data:
            raise ValueError("garbage must be at least one byte")
        self._set(_Fault(mode="garbage", garbage=data))

    @property
    def connections_accepted(self) -> int:
        return self._relay_now().connections_accepted

    @property
    def connections_open(self) -> int:
        return sum(1 for end in list(self._relay_now().ends) if end.is_client)

    @property
    def bytes_from_clients(self) -> int:
        return self._relay_now().bytes_from_clients

    @property
    def bytes_from_target(self) -> int:
        return self._relay_now().bytes_from_target

    @property
    def bytes_to_target(self) -> int:
        return self._relay_now().bytes_to_target

    @property
    def bytes_to_clients(self) -> int:
        return self._relay_now().bytes_to_clients

    def _relay_now(self) -> _Relay:
        if self._relay is None:
            raise RuntimeError("the proxy is not running: use it as a context manager")
        return self._relay

    def _set(self, fault: _Fault) -> None:
        # Applied inside the loop so that no chunk is handled half under the old fault.
        relay = self._relay_now()
        assert self._loop is not None
        applied: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            relay.set_fault(fault)
            applied.set_result(None)

        self._loop.call_soon_threadsafe(apply)
        applied.result(timeout=PROXY_STOP_S)


# --- a private PostgreSQL -----------------------------------------------------------------

POSTGRES_START_S = 60.0


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parts[-3])
    return found[-1].parent if found else None


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb into a temporary directory, trust
    auth, loopback only, never port 5432) that a test may stop, crash and start again on
    the same port. As root, its programs run as the postgres user (initdb refuses root)."""

    def __init__(self, bin_dir: Path, directory: Path, port: int) -> None:
        self._bin = bin_dir
        self._data = directory / "data"
        self._log = directory / "postgres.log"
        self.port = port
        self._as: list[str] = ["runuser", "-u", "postgres", "--"] if _is_root() else []
        self._run("initdb", "-D", str(self._data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        done = subprocess.run(
            [*self._as, str(self._bin / program), *args],
            capture_output=True,
            text=True,
            timeout=POSTGRES_START_S,
            check=False,
        )
        if check and done.returncode != 0:
            log = self._log.read_text(errors="replace")[-3000:] if self._log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}\n{log}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{LOCALHOST}:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server; return once it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses={LOCALHOST} -k {self._data}"
            " -c fsync=off -c max_connections=60"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self._data),
            "-l",
            str(self._log),
            "-o",
            options,
            "-w",
            "-t",
            str(int(POSTGRES_START_S)),
            "start",
        )

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server ("immediate": as a crash, no checkpoint); return once its port
        refuses connections."""
        self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop", check=False)
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not _refuses(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still accepts after PostgreSQL stopped")
            time.sleep(POLL_S)


def _is_root() -> bool:
    return os.geteuid() == 0


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh PostgreSQL cluster on a free loopback port, stopped and removed on exit."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL", FileNotFoundError("no /usr/lib/postgresql/*/bin/pg_ctl"))
        return  # unavailable() skips or fails: it never returns
    directory = Path(tempfile.mkdtemp(prefix="private_pg_"))
    try:
        if _is_root():
            shutil.chown(directory, "postgres", "postgres")
        server = PrivatePostgres(bin_dir, directory, free_port())
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
