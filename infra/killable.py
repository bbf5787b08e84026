"""CPU work that must stop at a deadline: NumPy cannot be interrupted from its own thread
(Dramatiq's TimeLimit only raises between bytecodes), so each call runs in a child
process that is killed when the deadline passes. Children fork from a server that has
already imported the heavy modules, so a call costs a fork, not an interpreter start."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Callable, Sequence
from typing import Any

PRELOAD = ["numpy", "msgspec", "domain.forecast_model"]

_context_lock = threading.Lock()
_context: Any = None


class DeadlineExceededError(Exception):
    """Raised when the call did not finish in time; the child was killed."""


class ChildFailedError(Exception):
    """Raised when the call raised in the child (its message is carried over) or the
    child died without an answer."""


def _context_() -> Any:
    global _context  # noqa: PLW0603 (one forkserver per process, made on first use)
    with _context_lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        return _context


def _child(
    conn: multiprocessing.connection.Connection,
    call: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> None:
    try:
        conn.send(("ok", call(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 (everything is reported to the parent)
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run(
    call: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float,
) -> Any:
    """``call(*args, **kwargs)`` in a child process; its result, or an error once
    ``timeout_s`` passed (the child is killed then)."""
    context = _context_()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, call, args, kwargs or {}), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise DeadlineExceededError(f"over its limit of {timeout_s} s")
        try:
            status, value = receiver.recv()
        except EOFError:
            child.join(5)
            raise ChildFailedError(f"the computation died (exit code {child.exitcode})") from None
        if status == "error":
            raise ChildFailedError(value)
        return value
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(5)


def warm_up() -> None:
    """Starts the fork server now (it imports NumPy once), so the first job does not pay
    for it inside its time limit."""
    run(_nothing, timeout_s=60)


def _nothing() -> None:
    return None
