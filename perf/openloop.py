"""An open-loop load generator: requests are sent at fixed, scheduled times whatever the
server does, over keep-alive connections with pre-built request bytes, and each latency
is measured from the request's *scheduled* send time (so a stalled server shows in the
tail instead of slowing the load down: no coordinated omission). Reports p50/p95/p99 per
route and the generator's own CPU, to show it was not the bottleneck.

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

    async def exchange(self, request: bytes) -> int:
        """Sends one request and reads its whole answer; its status."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _run(
    url: str, plan: Sequence[tuple[str, bytes]], rate: float, duration_s: float
) -> OpenLoopResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[_Connection] = []
    opened = 0

    async def connect() -> _Connection:
        nonlocal opened
        reader, writer = await asyncio.open_connection(host, port)
        opened += 1
        return _Connection(reader, writer)

    for _ in range(CONNECTIONS):
        idle.append(await connect())
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    non_2xx = 0
    lags: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(route: str, request: bytes, due: float) -> None:
        nonlocal non_2xx
        conn = idle.pop() if idle else None
        try:
            if conn is None:
                if opened >= MAX_CONNECTIONS:
                    raise ConnectionError("too many connections")
                conn = await connect()
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status = await conn.exchange(request)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            errors[route] = errors.get(route, 0) + 1
            if conn is not None:
                conn.close()
            return
        took = time.perf_counter() - due
        idle.append(conn)
        if status >= 400:
            non_2xx += 1
            errors[route] = errors.get(route, 0) + 1
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
    )


def open_loop(
    url: str,
    requests: Sequence[PlanLine],
    rate: float,
    duration_s: float,
    *,
    seed: int = 1,
) -> OpenLoopResult:
    """Sends ``rate`` requests per second for ``duration_s`` to ``url``, drawn in a seeded
    random order from ``requests``; on a uvloop event loop of its own."""
    host = urlsplit(url).netloc
    order = list(requests)
    random.Random(seed).shuffle(order)
    plan = [(line.route, request_bytes(host, line)) for line in order]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(url, plan, rate, duration_s))


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
