"""Stopping an API process without dropping work: on SIGTERM it first says it is draining
(/health/ready answers 503) while it goes on serving for ``shutdown_drain_s``, so load
balancers take it out of rotation; then it stops accepting, lets the requests in flight
finish (uvicorn's graceful shutdown), and the process exits 0."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request

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
