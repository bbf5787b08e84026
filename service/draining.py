"""Stopping an API process without dropping work: on SIGTERM it first says it is draining
(/health/ready answers 503) while it goes on serving for ``shutdown_drain_s``, so load
balancers take it out of rotation; then it stops accepting, lets the requests in flight
finish (uvicorn's graceful shutdown), and the process exits 0. With several worker
processes on one port, the parent forwards SIGTERM to each and exits 0 once all have."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import select
import signal
import socket
import time
import urllib.parse
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

import httptools
import uvicorn
import uvloop
from prometheus_client import multiprocess
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as Cycle

from infra import metrics
from service import errors, shedding

logger = logging.getLogger("accubooks.draining")

_STATE_KEY = "draining"


def is_draining(request: Request) -> bool:
    """True from the process's SIGTERM on (never in an app that no server drains)."""
    return bool(getattr(request.app.state, _STATE_KEY, False))


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a draining phase before its graceful shutdown on SIGTERM
    (other signals keep uvicorn's handling)."""

    def __init__(self, config: uvicorn.Config, app: Starlette, *, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        # A signal handler: only flags here; the loop acts on them at its next tick. Not
        # passed on to uvicorn, which would re-raise SIGTERM once stopped (exit 143, not 0).
        if self._stop_at is None:
            setattr(self._app.state, _STATE_KEY, True)
            self._stop_at = time.monotonic() + self._drain_s
        else:
            self._stop_at = time.monotonic()  # a second SIGTERM ends the draining phase

    async def on_tick(self, counter: int) -> bool:
        stop_at = self._stop_at
        if stop_at is not None and not self.should_exit and time.monotonic() >= stop_at:
            logger.warning("draining over: no longer accepting, finishing requests in flight")
            self.should_exit = True
        return await super().on_tick(counter)


def _gate_of(app: object) -> shedding.Gate | None:
    """The shedding gate of the Starlette app inside uvicorn's wrappers, if any."""
    for _ in range(8):
        if isinstance(app, Starlette):
            gate = getattr(app.state, "shed_gate", None)
            return gate if isinstance(gate, shedding.Gate) else None
        app = getattr(app, "app", None)
    return None


_SHED_HEAD = STATUS_LINE[503] + (
    b"content-type: application/json\r\nretry-after: %d\r\n" % errors.RETRY_AFTER_S
)


# Header names after which a request is not answered by the fast path (whose answer is
# canned): a body may follow, the connection's handling may change, or the client's own
# request id is to be echoed.
_NOT_AT_ONCE = (
    b"\r\ncontent-length:",
    b"\r\ntransfer-encoding:",
    b"\r\nconnection:",
    b"\r\nupgrade:",
    b"\r\nexpect:",
    b"\r\nx-request-id:",
)
# Header blocks the parser may read otherwise than the checks above (a space before a
# colon, a folded line, a line ending in a bare LF or CR): left to the parser, which
# refuses what HTTP does not allow.
_UNUSUAL = re.compile(rb"[ \t]:|\n[ \t]|[^\r]\n|\r[^\n]")
_EXEMPT = tuple(prefix.encode() for prefix in shedding.EXEMPT_PREFIXES)


class SheddingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which answers 503 OVERLOADED by itself while the app's
    gate is full: no task, no ASGI messages, no middleware. A shed request then costs
    little more than reading it, and the core stays with the admitted ones
    (perf.overload_bench measures both).

    Two paths. The common request under load, one plain GET that arrives whole in one read
    between messages, is answered in ``data_received`` before the parser sees it (the
    parser's callbacks and uvicorn's scope were two thirds of a shed's CPU). Any other is
    answered once the parser has its headers (``on_headers_complete``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = _gate_of(self.app)
        # The parser has begun a message it has not finished: data is not a new request.
        self._mid_message = False

    def on_message_begin(self) -> None:
        self._mid_message = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._mid_message = False
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        gate = self._gate
        if (
            gate is None
            or not gate.full()
            or self._mid_message
            or (self.cycle is not None and not self.cycle.response_complete)
            or not self._shed_at_once(gate, data)
        ):
            super().data_received(data)

    def _shed_at_once(self, gate: shedding.Gate, data: bytes) -> bool:
        """Answers ``data`` 503 OVERLOADED when it is exactly one whole GET request without
        a body that HTTP/1.1 keeps alive and that no exempt route serves; else False, and
        ``data`` is left to the parser (which then sheds it, or not, as it finds it)."""
        if not data.startswith(b"GET /") or data.find(b"\r\n\r\n") != len(data) - 4:
            return False
        line_end = data.find(b"\r\n")
        line = data[:line_end]
        if not line.endswith(b" HTTP/1.1"):
            return False
        target = line[4:-9]
        path = target.partition(b"?")[0]
        if b"%" in path or b" " in target or path.startswith(_EXEMPT):
            return False
        headers = data[line_end:].lower()
        if any(name in headers for name in _NOT_AT_ONCE) or _UNUSUAL.search(headers):
            return False
        started = time.perf_counter()
        scope = cast(
            Scope,
            {
                "type": "http",
                "method": "GET",
                "path": path.decode("latin-1"),
                "root_path": self.root_path,
                "headers": [],
            },
        )
        self.transport.write(self._overloaded(gate, scope, keep_alive=True))
        self.on_response_complete()  # re-arms the keep-alive timeout, as after any answer
        gate.shed_by_protocol(scope, time.perf_counter() - started)
        return True

    def on_headers_complete(self) -> None:
        gate = self._gate
        if (
            gate is None
            or not gate.full()
            # A request pipelined behind one still answering keeps uvicorn's order.
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.parser.should_upgrade()
        ):
            super().on_headers_complete()
            return
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)  # as uvicorn does: /health%2Flive is health
        if path.startswith(shedding.EXEMPT_PREFIXES):
            super().on_headers_complete()
            return
        started = time.perf_counter()
        http_version = self.parser.get_http_version()
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        self.scope["method"] = self.parser.get_method().decode("ascii")
        self.scope["path"] = path
        scope = cast(Scope, self.scope)
        # The request's body, if any, is read and dropped by the parser as it comes.
        self.cycle = Cycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=False,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=keep_alive,
            on_response=self.on_response_complete,
        )
        self.cycle.response_complete = True
        self.transport.write(self._overloaded(gate, scope, keep_alive=keep_alive))
        if keep_alive:
            self.on_response_complete()
        else:
            self.transport.close()
        gate.shed_by_protocol(scope, time.perf_counter() - started)

    def _overloaded(self, gate: shedding.Gate, scope: Scope, *, keep_alive: bool) -> bytes:
        """The whole 503 OVERLOADED answer to the request of ``scope``."""
        request_id = gate.request_id(scope)
        body = errors.overloaded_body(request_id)
        head = [_SHED_HEAD]
        head += [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
        head.append(b"x-request-id: %s\r\n" % request_id.encode())
        head.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", body]
        return b"".join(head)


def serve(
    app: Starlette,
    *,
    host: str,
    port: int,
    workers: int,
    drain_s: float,
    started: Callable[[str], object],
) -> int:
    """Serves ``app`` as every API process does (and the benchmarks' hello baseline, so it
    is served the same way): uvicorn's protocol with httptools on uvloop, bound here, in
    this process or in ``workers`` forked processes. ``started`` gets the URL once it
    serves. The exit status: 0 after a drained SIGTERM."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=SheddingProtocol,
        # No logging setup of uvicorn's own: its loggers then write through ours (JSON
        # lines), and the access log is ours (route templates, request and tenant ids).
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="on",
        # Nothing reads the client's address; uvicorn's proxy-headers middleware cost
        # about 3 % of a read's CPU.
        proxy_headers=False,
    )
    sock = config.bind_socket()
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host}:{bound_port}"
    if workers == 1:
        return serve_in_process(config, app, sock, drain_s=drain_s, started=lambda: started(url))
    return run_workers(
        config, app, sock, drain_s=drain_s, workers=workers, started=lambda: started(url)
    )


def serve_in_process(
    config: uvicorn.Config,
    app: Starlette,
    sock: socket.socket,
    *,
    drain_s: float,
    started: Callable[[], object],
) -> int:
    """Serves ``app`` on the bound ``sock`` until SIGTERM has drained it (or SIGINT);
    ``started`` is called once the lifespan has started and the socket accepts. The loop
    is uvloop: under the read mix it took a third off the server's CPU per request."""
    server = DrainingServer(config, app, drain_s=drain_s)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            # What the process holds once it serves (modules, routes, pools) lives as long
            # as it does: frozen, the collector never walks it again. Under overload a full
            # collection then took 4 ms instead of 43 (every 1.5 s, collecting nothing),
            # a pause every request in the process waited out.
            gc.collect()
            gc.freeze()
            started()
        await task

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())
    return 0 if server.started else 1


def run_workers(
    config: uvicorn.Config,
    app: Starlette,
    sock: socket.socket,
    *,
    drain_s: float,
    workers: int,
    started: Callable[[], object],
) -> int:
    """Forks ``workers`` processes that each serve the one listening ``sock`` (the kernel
    spreads connections over their accept calls). The parent only supervises: SIGTERM is
    passed on to every worker, each drains as one process would; SIGINT reaches them from
    the terminal (the process group) and is not passed on twice. A worker that dies on its
    own stops the others, and the parent exits non-zero (its supervisor restarts it)."""
    ready_r, ready_w = os.pipe()
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            code = 1
            try:
                code = serve_in_process(
                    config, app, sock, drain_s=drain_s, started=lambda: os.write(ready_w, b".")
                )
            except BaseException:
                logger.exception("an API worker process failed")
            finally:
                os._exit(code)
        children.append(pid)
    os.close(ready_w)
    sock.close()  # the workers hold it
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, lambda *_: None)
    _await_ready(ready_r, workers, children)
    started()
    code = 0
    alive = set(children)
    while alive:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        alive.discard(pid)
        if metrics.MULTIPROCESS:
            # Its gauges (the in-flight bound) leave /metrics with it.
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 and not stopping:
            logger.error("API worker %d exited with %d: stopping the others", pid, exit_code)
            forward(signal.SIGTERM, None)
        code = code or (exit_code if exit_code > 0 else 1 if exit_code else 0)
    return code


def _await_ready(ready_r: int, workers: int, children: list[int]) -> None:
    """Until every worker has said it serves (one byte each), or one has exited."""
    ready = 0
    while ready < workers:
        readable, _, _ = select.select([ready_r], [], [], 0.2)
        if readable:
            got = os.read(ready_r, workers)
            if not got:
                return
            ready += len(got)
        elif any(os.waitpid(child, os.WNOHANG)[0] for child in children):
            return
    os.close(ready_r)
