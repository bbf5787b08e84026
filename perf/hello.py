"""The baseline server: a bare Starlette JSON hello, served exactly as `accubooks api` serves
(service.draining.serve: uvicorn's protocol with httptools on uvloop, the same number of
worker processes), so that the ratio of the API to it measures the app, not the server.

    .venv/bin/python -m perf.hello --port 8001 --workers 1
"""

from __future__ import annotations

import argparse
import sys

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import draining


def hello_app() -> Starlette:
    """The app (also for uvicorn as a factory: ``perf.hello:hello_app``)."""

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    return Starlette(routes=[Route("/", hello)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.hello", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    return draining.serve(
        hello_app(),
        host=args.host,
        port=args.port,
        workers=args.workers,
        drain_s=0.0,
        started=lambda url: print(msgspec.json.encode({"url": url}).decode(), flush=True),
    )


if __name__ == "__main__":
    sys.exit(main())
