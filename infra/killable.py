"""CPU work that must stop at a deadline: NumPy cannot be interrupted from its own thread
(Dramatiq's TimeLimit only raises between bytecodes), so calls run in child processes
that are killed when a deadline passes.

Children are long-lived and reused: starting one costs an interpreter and the imports of
the main module (about a second here), which a job must not pay. A child that missed its
deadline is killed and replaced; the others stay warm in a pool.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

PRELOAD = ["numpy", "msgspec", "domain.forecast_model"]

_context_lock = threading.Lock()
_context: Any = None
_idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
_START_TIMEOUT_S = 120.0


class DeadlineExceededError(Exception):
    """Raised when the call did not finish in time; its child was killed."""


class ChildFailedError(Exception):
    """Raised when the call raised in the child (its message is carried over) or the
    child died without an answer."""


def _context_() -> Any:
    global _context  # noqa: PLW0603 (one fork server per process, made on first use)
    with _context_lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        return _context


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The child's loop: one call at a time, each answer sent back, until the pipe closes."""
    while True:
        try:
            call, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", call(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 (everything is reported to the parent)
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Child:
    def __init__(self) -> None:
        context = _context_()
        self.conn, theirs = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(theirs,), daemon=True)
        self.process.start()
        theirs.close()

    def call(
        self,
        call: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        timeout_s: float,
    ) -> Any:
        self.conn.send((call, tuple(args), kwargs))
        if not self.conn.poll(timeout_s):
            raise DeadlineExceededError(f"over its limit of {timeout_s} s")
        status, value = self.conn.recv()
        if status == "error":
            raise ChildFailedError(value)
        return value

    def kill(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


def run(
    call: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float,
) -> Any:
    """``call(*args, **kwargs)`` in a pooled child process; its result, or an error once
    ``timeout_s`` passed (that child is killed then)."""
    try:
        child = _idle.get_nowait()
    except queue.Empty:
        # A new child's start (about a second) must not count against the call's limit.
        child = _Child()
        child.call(_nothing, (), {}, _START_TIMEOUT_S)
    try:
        result = child.call(call, args, kwargs or {}, timeout_s)
    except ChildFailedError:
        _idle.put(child)  # the call failed; the child itself is fine
        raise
    except (DeadlineExceededError, EOFError, OSError) as e:
        child.kill()
        # Replace it off the caller's clock, so the next call finds a warm child.
        threading.Thread(target=warm_up, name="killable-replace", daemon=True).start()
        if isinstance(e, DeadlineExceededError):
            raise
        raise ChildFailedError(f"the computation died: {e}") from None
    _idle.put(child)
    return result


def warm_up(children: int = 1) -> None:
    """Starts ``children`` children now, so no job pays for a start inside its limit."""
    started = [_Child() for _ in range(children)]
    for child in started:
        child.call(_nothing, (), {}, _START_TIMEOUT_S)
        _idle.put(child)


def _nothing() -> None:
    return None
