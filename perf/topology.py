"""The production topology on this machine, started by one script: a fresh PostgreSQL
database on the shared server, two private redis-servers (the cache, and the broker of
the forecast jobs: separate roles, as in production), N `accubooks api` processes, the
projection worker (`accubooks project`) and the job worker (`accubooks worker`).

The data is seeded through the log before the workers start (tenant commands, then the
aggregates as the commands and the job worker save them, never read-model rows); the
projection worker then builds every read model from position 0 and stays running, so
what a benchmark writes through the API is projected live.

    .venv/bin/python -m perf.topology --tenants 50 --scenarios 400 --forecasts 3 \\
        --large-tenant 100000 --api-processes 2 --hold-s 600

starts it all, prints where each API process listens and writes the seeded keys and ids
to a JSON file (--keys-out), then holds it up until Ctrl-C or --hold-s; every process
and the database are gone afterwards. The benchmarks use `production()` directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import msgspec

from infra.eventstore import open_event_log
from infra.settings import Settings
from perf.harness import ADMIN_URL, REQUEST_TIMEOUT_S, Deadline, postgres_database
from perf.processes import Process, accubooks, private_redis, stop_on_signals
from perf.seeding import (
    SeedCounts,
    TenantReads,
    seed_large_tenant,
    seed_tenants,
    wait_caught_up,
    writer_keys,
)

DISTINCT_RESULTS = 8  # model runs per assumption type, shared by the seeded forecasts


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """What is seeded and how many API processes serve it."""

    tenants: int = 50
    scenarios: int = 400  # per tenant
    forecasts: int = 3  # per scenario
    large_tenant: int = 100_000  # scenarios of one more tenant (0: none)
    api_processes: int = 2


class Seeded(msgspec.Struct, frozen=True, kw_only=True):
    """What the seeding wrote and how long it and the first projection took."""

    tenants: int
    scenarios: int
    archived: int
    forecasts_completed: int
    forecasts_failed: int
    forecasts_queued: int
    large_tenant_scenarios: int
    events: int
    write_s: float
    catch_up_s: float


@dataclass
class Topology:
    """A running topology: where everything is, and the seeded tenants."""

    database_url: str
    cache_url: str
    broker_url: str
    api_urls: list[str]
    api_pids: list[int]
    project_pid: int
    worker_pid: int
    seeded: Seeded
    tenants: list[TenantReads]  # the regular tenants (reader keys, ids)
    writers: list[str]  # a writer key per regular tenant, same order
    large: TenantReads | None
    processes: list[Process] = field(default_factory=list)

    def alive(self) -> list[str]:
        """The processes that have exited (empty when all run)."""
        return [p.name for p in self.processes if p.proc.poll() is not None]


def service_env(cache_url: str, broker_url: str, extra: dict[str, str] | None) -> dict[str, str]:
    return {
        "REDIS_URL": cache_url,
        "BROKER_URL": broker_url,
        "ACCUBOOKS_LOG_LEVEL": "WARNING",
        **(extra or {}),
    }


@dataclass
class _Seeding:
    counts: SeedCounts
    tenants: list[TenantReads]
    writers: list[str]
    large: TenantReads | None
    end: int
    write_s: float


def _seed(database_url: str, shape: Shape, deadline: Deadline) -> _Seeding:
    log = open_event_log(Settings(database_url=database_url))
    try:
        started = time.perf_counter()
        counts, tenants = seed_tenants(
            log,
            tenants=shape.tenants,
            scenarios=shape.scenarios,
            forecasts=shape.forecasts,
            deadline=deadline,
            tenant_name="Suite",
            distinct_results=DISTINCT_RESULTS,
        )
        writers = writer_keys(log, tenants)
        large = (
            seed_large_tenant(log, scenarios=shape.large_tenant, deadline=deadline)
            if shape.large_tenant
            else None
        )
        return _Seeding(
            counts, tenants, writers, large, log.position(), time.perf_counter() - started
        )
    finally:
        log.close()


@contextmanager
def production(
    shape: Shape,
    deadline: Deadline,
    *,
    api_env: dict[str, str] | None = None,
    admin_url: str = ADMIN_URL,
) -> Iterator[Topology]:
    """The whole topology, seeded and caught up; always taken down."""
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="topology_"))
        database_url = stack.enter_context(postgres_database(admin_url))
        print("seeding through the log...", file=sys.stderr, flush=True)
        seeding = _seed(database_url, shape, deadline)
        counts, tenants, writers, large = (
            seeding.counts,
            seeding.tenants,
            seeding.writers,
            seeding.large,
        )
        end, write_s = seeding.end, seeding.write_s
        print(f"seeded {end:,} events in {write_s:.1f} s", file=sys.stderr, flush=True)
        cache_dir, broker_dir = Path(tmp, "cache"), Path(tmp, "broker")
        cache_dir.mkdir()
        broker_dir.mkdir()
        cache = stack.enter_context(private_redis(str(cache_dir), deadline))
        broker = stack.enter_context(private_redis(str(broker_dir), deadline))
        env = service_env(cache.url, broker.url, api_env)
        project = stack.enter_context(accubooks(["project"], database_url, env))
        project.first_line(deadline)
        catch_up_s = wait_caught_up(database_url, end, project, deadline)
        print(f"read models caught up in {catch_up_s:.1f} s", file=sys.stderr, flush=True)
        worker = stack.enter_context(accubooks(["worker"], database_url, env))
        worker.first_line(deadline)
        apis: list[Process] = []
        urls: list[str] = []
        for _ in range(shape.api_processes):
            api = stack.enter_context(
                accubooks(["api", "--host", "127.0.0.1", "--port", "0"], database_url, env)
            )
            urls.append(str(api.first_line(deadline)["url"]))
            apis.append(api)
        for url in urls:
            httpx.get(url + "/health/live", timeout=REQUEST_TIMEOUT_S, trust_env=False)
        yield Topology(
            database_url=database_url,
            cache_url=cache.url,
            broker_url=broker.url,
            api_urls=urls,
            api_pids=[api.proc.pid for api in apis],
            project_pid=project.proc.pid,
            worker_pid=worker.proc.pid,
            seeded=Seeded(
                tenants=shape.tenants + (1 if large else 0),
                scenarios=counts.scenarios,
                archived=counts.archived,
                forecasts_completed=counts.completed,
                forecasts_failed=counts.failed,
                forecasts_queued=counts.queued,
                large_tenant_scenarios=shape.large_tenant,
                events=end,
                write_s=round(write_s, 2),
                catch_up_s=round(catch_up_s, 2),
            ),
            tenants=tenants,
            writers=writers,
            large=large,
            processes=[project, worker, *apis],
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.topology", description=__doc__)
    defaults = Shape()
    parser.add_argument("--tenants", type=int, default=defaults.tenants)
    parser.add_argument("--scenarios", type=int, default=defaults.scenarios)
    parser.add_argument("--forecasts", type=int, default=defaults.forecasts)
    parser.add_argument("--large-tenant", type=int, default=defaults.large_tenant)
    parser.add_argument("--api-processes", type=int, default=defaults.api_processes)
    parser.add_argument("--hold-s", type=float, default=600.0, help="how long to stay up")
    parser.add_argument("--keys-out", default="topology-keys.json")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop_on_signals()
    shape = Shape(
        tenants=args.tenants,
        scenarios=args.scenarios,
        forecasts=args.forecasts,
        large_tenant=args.large_tenant,
        api_processes=args.api_processes,
    )
    deadline = Deadline(time.monotonic() + 1800 + args.hold_s)
    try:
        with production(shape, deadline, admin_url=args.admin_url) as top:
            keys = {
                "apiUrls": top.api_urls,
                "tenants": [
                    {"tenantId": t.tenant_id, "readerKey": t.key, "writerKey": w}
                    for t, w in zip(top.tenants, top.writers, strict=True)
                ],
            }
            Path(args.keys_out).write_bytes(msgspec.json.format(msgspec.json.encode(keys)))
            print(
                msgspec.json.encode(
                    {"apiUrls": top.api_urls, "keys": os.path.abspath(args.keys_out)}
                ).decode(),
                flush=True,
            )
            until = time.monotonic() + args.hold_s
            while time.monotonic() < until and not top.alive():
                time.sleep(1.0)
            if top.alive():
                print(f"exited: {top.alive()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
