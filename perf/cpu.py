"""CPU time by process during a measured run, from /proc (Linux): named processes, the
PostgreSQL backends of a database, this process, its reaped children (a load generator
such as wrk) and the whole machine."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (threads included); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    # user nice system idle iowait irq softirq steal ...: busy is all but idle, iowait
    # and steal (time the hypervisor gave to someone else).
    user, nice, system, _, _, irq, softirq = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) * _TICK_S


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def backend_pids(database_url: str) -> list[int]:
    """The PostgreSQL backends connected to the database, but for the one asking."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


@dataclass(frozen=True)
class CpuUsed:
    """CPU seconds used between CpuMeter.start() and stop(), and the wall seconds between."""

    wall_s: float
    # By the name given to CpuMeter; None when the process was gone at either end.
    processes: dict[str, float | None]
    # The backends alive at either end (None: no database given); how many were read.
    postgres_s: float | None
    postgres_backends: int
    this_process_s: float
    # Children reaped in between (e.g. a wrk run), not those still running.
    children_s: float
    machine_s: float


@dataclass
class CpuMeter:
    """Measures one run at a time: start() before it, stop() after it (again for the next)."""

    processes: dict[str, int]
    database_url: str | None = None
    _pg: dict[int, float] = field(default_factory=dict)
    _processes: dict[str, float | None] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        # The slow part (a connection to PostgreSQL) first; the clocks this process's own
        # work shows in last, so that little of the meter falls inside the run.
        self._pg = (
            {}
            if self.database_url is None
            else {
                pid: cpu
                for pid in backend_pids(self.database_url)
                if (cpu := cpu_s(pid)) is not None
            }
        )
        self._processes = {name: cpu_s(pid) for name, pid in self.processes.items()}
        self._start = {
            "machine": machine_busy_s(),
            "children": children_cpu_s(),
            "this_process": time.process_time(),
            "wall": time.perf_counter(),
        }

    def stop(self) -> CpuUsed:
        wall = time.perf_counter() - self._start["wall"]
        this_process = time.process_time() - self._start["this_process"]
        children = children_cpu_s() - self._start["children"]
        machine = machine_busy_s() - self._start["machine"]
        processes: dict[str, float | None] = {}
        for name, pid in self.processes.items():
            now, then = cpu_s(pid), self._processes.get(name)
            processes[name] = None if now is None or then is None else now - then
        postgres: float | None = None
        used: list[float] = []
        if self.database_url is not None:
            pids = set(self._pg) | set(backend_pids(self.database_url))
            used = [cpu - self._pg.get(pid, 0.0) for pid in pids if (cpu := cpu_s(pid)) is not None]
            postgres = sum(used)
        return CpuUsed(
            wall_s=wall,
            processes=processes,
            postgres_s=postgres,
            postgres_backends=len(used),
            this_process_s=this_process,
            children_s=children,
            machine_s=machine,
        )
