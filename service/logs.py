"""Structured logs: one JSON object per line (msgspec-encoded) for every logger of the
process, and the access log, one line per request. A line carries ids, never secrets: no
header is ever logged, and of an API key only its id."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import msgspec

ACCESS = logging.getLogger("accubooks.access")
# Record attributes (given through ``extra``) that become fields of the line, in order.
FIELDS = ("request_id", "tenant_id", "key_id", "route", "method", "status", "duration_ms")

# Anything msgspec does not encode natively (an odd ``extra`` value) is written as text
# rather than losing the line.
_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: timestamp (RFC 3339, UTC), level, logger, message, the
    request fields it carries, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        attributes = record.__dict__
        for field in FIELDS:
            value = attributes.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _encoder.encode(line).decode()


class _JsonHandler(logging.StreamHandler[IO[str]]):
    """The handler configure_logging installs (so that a second call replaces it)."""


def configure_logging(level: int | str, stream: IO[str] | None = None) -> logging.Handler:
    """Makes every logger of the process write JSON lines to ``stream`` (stderr) from
    ``level`` on; returns the handler it installed on the root logger."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(handler)
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def access(state: dict[str, Any], route: str, method: str, status: int, duration_s: float) -> None:
    """Logs one line for an answered HTTP request: request id, tenant and key id when the
    request authenticated (the auth step records them on the request's state), route
    template, method, status and duration in milliseconds."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    # A record made and handled directly: Logger.info would also walk the stack for the
    # caller's file and line (unused here), a few percent of a cached read's CPU.
    record = ACCESS.makeRecord(
        ACCESS.name,
        logging.INFO,
        __file__,
        0,
        "%s %s %d",
        (method, route, status),
        None,
        extra={
            "request_id": state.get("request_id"),
            "tenant_id": state.get("tenant_id"),
            "key_id": state.get("key_id"),
            "route": route,
            "method": method,
            "status": status,
            "duration_ms": round(duration_s * 1000, 3),
        },
    )
    ACCESS.handle(record)
