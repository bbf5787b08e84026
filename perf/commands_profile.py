"""py-spy on an API process during a benchmark phase, summarized for a report: where the
GIL was held, by thread, by our own functions and by the frames holding it themselves."""

from __future__ import annotations

import collections
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from perf.harness import ROOT


@contextmanager
def profiling(pid: int, seconds: float, out: Path) -> Iterator[None]:
    """py-spy records ``pid`` (threads holding the GIL: the process's Python CPU) while the
    block runs."""
    spy = ROOT / ".venv" / "bin" / "py-spy"
    command = [str(spy), "record", "--pid", str(pid), "-d", f"{max(1, int(seconds))}"]
    command += ["-r", "250", "--format", "raw", "-s", "--gil", "-o", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Where a sample's thread was: the first of these found in its stack names it.
_THREADS = (
    ("group committer thread", "GroupCommitter._run"),
    ("worker threads (anyio)", "WorkerThread.run"),
    ("event loop (HTTP, middleware, routes)", "Runner.run"),
)
_OURS = re.compile(r"\((?:commands|infra|service|domain)/")


def profile_lines(raw: Path, top: int = 20) -> list[str]:
    """Where the GIL was held: by thread, our own functions inclusive, and the frames
    that held it by themselves, in % of samples."""
    if not raw.exists():
        return ["(py-spy wrote nothing: is ptrace allowed?)"]
    threads: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]
        joined = ";".join(frames)
        threads[next((name for name, mark in _THREADS if mark in joined), "other")] += n
        for frame in set(frames):
            if _OURS.search(frame):
                ours[frame] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples holding the GIL; by thread:"]
    lines += [f"{n / total * 100:5.1f}% {name}" for name, n in threads.most_common()]
    lines.append("our functions, inclusive:")
    lines += [f"{n / total * 100:5.1f}% {f}" for f, n in ours.most_common(top)]
    lines.append("frames holding the GIL by themselves:")
    lines += [f"{n / total * 100:5.1f}% {f}" for f, n in own.most_common(top // 2)]
    return lines
