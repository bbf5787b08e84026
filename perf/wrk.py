"""Load generation with wrk and perf/read_mix.lua: the plan file it replays (one request a
line), the command line, running it within the budget, and its machine-readable result."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgspec

from perf.harness import ROOT, Deadline

LUA = ROOT / "perf" / "read_mix.lua"
RESULT_MARK = "READ_BENCH_RESULT "  # read_mix.lua's done() prints it before the result
NO_KEY = "-"  # a plan line's key when the request carries no Authorization header
# How long wrk may run beyond its own duration (its connections' timeout, the summary)
# before it counts as stuck.
OVERRUN_S = 60.0


class PlanLine(NamedTuple):
    """One request of a plan: read_mix.lua sends GET ``path`` with ``key`` as a bearer
    token; ``route`` names it for people (wrk does not report per route)."""

    route: str
    path: str
    key: str | None


def write_plan(path: Path, lines: Iterable[PlanLine]) -> None:
    """A plan file for read_mix.lua, which draws its requests from the lines at random
    (so the lines carry the mix's proportions)."""
    path.write_text(
        "\n".join(f"{line.route}\t{line.path}\t{line.key or NO_KEY}" for line in lines) + "\n"
    )


def read_plan(path: Path) -> list[PlanLine]:
    found = []
    for line in path.read_text().splitlines():
        route, target, key = line.split("\t")
        found.append(PlanLine(route, target, None if key == NO_KEY else key))
    return found


class Wrk(msgspec.Struct, frozen=True, kw_only=True):
    """What read_mix.lua's done() prints (microseconds)."""

    requests: int
    duration_us: int
    bytes: int
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int  # answers with a status of 400 or more
    timeouts: int
    p50_us: int
    p90_us: int
    p95_us: int
    p99_us: int
    max_us: int
    mean_us: float

    @property
    def socket_errors(self) -> int:
        """Connect, read and write errors and timeouts."""
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts


@dataclass(frozen=True)
class LoadShape:
    connections: int
    threads: int
    duration_s: float
    warmup_s: float
    timeout_s: float


def wrk_command(url: str, plan: Path, shape: LoadShape, seconds: float) -> list[str]:
    """wrk with read_mix.lua replaying ``plan`` against ``url`` for ``seconds``."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk (Debian's package)")
    return [
        wrk,
        f"-t{shape.threads}",
        f"-c{shape.connections}",
        f"-d{seconds:g}s",
        f"--timeout={shape.timeout_s:g}s",
        "-s",
        str(LUA.relative_to(ROOT)),
        url,
        "--",
        str(plan),
    ]


def run_wrk(command: list[str], seconds: float, deadline: Deadline) -> Wrk:
    """Runs a wrk_command of ``seconds`` to its end (a child of this process, so its CPU
    shows in perf.cpu's children once it returns) and parses its result."""
    if deadline.remaining() < seconds + 5:
        raise SystemExit("the budget ran out before a wrk run")
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=seconds + OVERRUN_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"wrk did not finish within {seconds + OVERRUN_S:g} s") from None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return msgspec.json.decode(line.removeprefix(RESULT_MARK), type=Wrk)
    raise SystemExit(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
