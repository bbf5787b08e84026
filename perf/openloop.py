"""An open-loop load generator: requests are sent at fixed, scheduled times whatever the
server does, over keep-alive connections with pre-built request bytes, and each latency
is measured from the request's *scheduled* send time (so a stalled server shows in the
tail instead of slowing the load down: no coordinated omission). Reports p50/p95/p99 per
route, per status (2xx together, other statuses each), per scheduled second, the error codes
of the answers that carry the error envelope, and the generator's own CPU, to show it was
not the bottleneck.

    .venv/bin/python -m perf.openloop http://127.0.0.1:8000 PLAN_FILE --rate 1000 --duration-s 20

(PLAN_FILE: perf/wrk.py's plan format, one request a line.) perf.read_bench runs it as a
phase of its own; `open_loop(url, requests, rate, duration_s)` is the function to call.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import uvloop

from perf.wrk import PlanLine, read_plan

# Connections opened before the first request; more are opened when all are busy.
CONNECTIONS = 32
MAX_CONNECTIONS = 512
# A request unanswered after this long counts as an error (timeout).
REQUEST_TIMEOUT_S = 10.0


class RouteLatency(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class SecondLatency(msgspec.Struct, frozen=True, kw_only=True):
    """The requests scheduled in one second of the run (0: the first)."""

    second: int
    ok_2xx: int
    non_2xx: int
    # Timeouts and connection errors.
    failed: int
    p99_2xx_ms: float
    max_2xx_ms: float


class _ErrorBody(msgspec.Struct, kw_only=True):
    code: str


class _Envelope(msgspec.Struct, kw_only=True):
    error: _ErrorBody


_ENVELOPE = msgspec.json.Decoder(_Envelope)
NO_ENVELOPE = "-"  # the code counted for an answer whose body is not the error envelope


class OpenLoopResult(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    rate_per_s: float
    duration_s: float
    scheduled: int
    completed: int
    errors: int
    # Answers with a status of 400 or more (counted in errors too).
    non_2xx: int
    achieved_per_s: float
    # How late the generator sent its requests (its own lag, included in the latencies).
    send_lag_p99_ms: float
    send_lag_max_ms: float
    connections_opened: int
    # The generator's CPU: seconds, and cores (CPU s per wall s) while it ran.
    client_cpu_s: float
    client_cores: float
    overall: RouteLatency
    routes: dict[str, RouteLatency]
    # By status: "2xx" for every 2xx answer, else the status itself ("503").
    statuses: dict[str, RouteLatency] = {}
    # Answers with a status of 400 or more by "<status> <error.code>" ("503 OVERLOADED";
    # the code NO_ENVELOPE when the body is not the error envelope).
    error_codes: dict[str, int] = {}
    per_second: list[SecondLatency] = []
    # Requests without an answer (counted in errors) by exception: TimeoutError, or the
    # connection's error ("ConnectionError": all MAX_CONNECTIONS opened were busy).
    failures: dict[str, int] = {}


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _summary(latencies: list[float], errors: int) -> RouteLatency:
    values = sorted(latencies)
    return RouteLatency(
        requests=len(values) + errors,
        errors=errors,
        p50_ms=round(_percentile(values, 0.50) * 1000, 3),
        p95_ms=round(_percentile(values, 0.95) * 1000, 3),
        p99_ms=round(_percentile(values, 0.99) * 1000, 3),
        max_ms=round((values[-1] if values else 0.0) * 1000, 3),
    )


def request_bytes(host: str, line: PlanLine) -> bytes:
    auth = f"Authorization: Bearer {line.key}\r\n" if line.key is not None else ""
    return f"GET {line.path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Sends one request and reads its whole answer; its status and body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        return status, await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


async def _run(
    url: str, plan: Sequence[tuple[str, bytes]], rate: float, duration_s: float, connections: int
) -> OpenLoopResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    # Taken oldest first, so that no connection sits idle past the server's keep-alive
    # timeout (uvicorn's: 5 s) and is found closed when its turn comes.
    idle: deque[_Connection] = deque()
    opened = 0

    async def connect() -> _Connection:
        nonlocal opened
        reader, writer = await asyncio.open_connection(host, port)
        opened += 1
        return _Connection(reader, writer)

    for _ in range(connections):
        idle.append(await connect())
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    non_2xx = 0
    # (scheduled offset from the start, latency or None for a failure, status or 0)
    outcomes: list[tuple[float, float | None, int]] = []
    codes: dict[str, int] = {}
    failures: dict[str, int] = {}
    lags: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(route: str, request: bytes, due: float) -> None:
        nonlocal non_2xx
        conn = idle.popleft() if idle else None
        try:
            if conn is None:
                if opened >= MAX_CONNECTIONS:
                    raise ConnectionError("too many connections")
                conn = await connect()
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, body = await conn.exchange(request)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            errors[route] = errors.get(route, 0) + 1
            failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            outcomes.append((due - started, None, 0))
            if conn is not None:
                conn.close()
            return
        took = time.perf_counter() - due
        idle.append(conn)
        outcomes.append((due - started, took, status))
        if status >= 400:
            non_2xx += 1
            errors[route] = errors.get(route, 0) + 1
            code = f"{status} {_error_code(body)}"
            codes[code] = codes.get(code, 0) + 1
            return
        latencies.setdefault(route, []).append(took)

    interval = 1.0 / rate
    total = int(rate * duration_s)
    cpu_before = time.process_time()
    started = time.perf_counter()
    for i in range(total):
        due = started + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - due))
        route, request = plan[i % len(plan)]
        task = asyncio.create_task(one(route, request, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT_S)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    for conn in idle:
        conn.close()
    all_latencies = [v for values in latencies.values() for v in values]
    lags.sort()
    completed = len(all_latencies)
    return OpenLoopResult(
        url=url,
        rate_per_s=rate,
        duration_s=duration_s,
        scheduled=total,
        completed=completed,
        errors=sum(errors.values()),
        non_2xx=non_2xx,
        achieved_per_s=round(completed / wall, 1),
        send_lag_p99_ms=round(_percentile(lags, 0.99) * 1000, 3),
        send_lag_max_ms=round((lags[-1] if lags else 0.0) * 1000, 3),
        connections_opened=opened,
        client_cpu_s=round(cpu, 2),
        client_cores=round(cpu / wall, 2),
        overall=_summary(all_latencies, sum(errors.values())),
        routes={
            route: _summary(latencies.get(route, []), errors.get(route, 0))
            for route in sorted(set(latencies) | set(errors))
        },
        statuses=_by_status(outcomes),
        error_codes=dict(sorted(codes.items())),
        per_second=_per_second(outcomes),
        failures=dict(sorted(failures.items())),
    )


def _error_code(body: bytes) -> str:
    try:
        return _ENVELOPE.decode(body).error.code
    except msgspec.DecodeError:
        return NO_ENVELOPE


def _status_class(status: int) -> str:
    return "2xx" if 200 <= status < 300 else str(status)


def _by_status(outcomes: list[tuple[float, float | None, int]]) -> dict[str, RouteLatency]:
    found: dict[str, list[float]] = {}
    for _, took, status in outcomes:
        if took is not None:
            found.setdefault(_status_class(status), []).append(took)
    return {name: _summary(values, 0) for name, values in sorted(found.items())}


def _per_second(outcomes: list[tuple[float, float | None, int]]) -> list[SecondLatency]:
    seconds: dict[int, list[tuple[float | None, int]]] = {}
    for offset, took, status in outcomes:
        seconds.setdefault(int(offset), []).append((took, status))
    rows = []
    for second, answers in sorted(seconds.items()):
        ok = sorted(took for took, status in answers if took is not None and 200 <= status < 300)
        failed = sum(1 for took, _ in answers if took is None)
        rows.append(
            SecondLatency(
                second=second,
                ok_2xx=len(ok),
                non_2xx=len(answers) - len(ok) - failed,
                failed=failed,
                p99_2xx_ms=round(_percentile(ok, 0.99) * 1000, 3),
                max_2xx_ms=round((ok[-1] if ok else 0.0) * 1000, 3),
            )
        )
    return rows


def open_loop(
    url: str,
    requests: Sequence[PlanLine],
    rate: float,
    duration_s: float,
    *,
    seed: int = 1,
    connections: int = CONNECTIONS,
) -> OpenLoopResult:
    """Sends ``rate`` requests per second for ``duration_s`` to ``url``, drawn in a seeded
    random order from ``requests``; on a uvloop event loop of its own, with ``connections``
    opened before the first request (more opened when all are busy, up to
    MAX_CONNECTIONS)."""
    host = urlsplit(url).netloc
    order = list(requests)
    random.Random(seed).shuffle(order)
    plan = [(line.route, request_bytes(host, line)) for line in order]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(url, plan, rate, duration_s, connections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.openloop", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("plan", type=Path, help="a plan file (perf/wrk.py's format)")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    result = open_loop(args.url, read_plan(args.plan), args.rate, args.duration_s)
    print(msgspec.json.format(msgspec.json.encode(result)).decode())
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
