"""The baseline server: a bare Starlette JSON hello. Kept alone in its module so the process
serving it (perf.processes.hello_server) imports nothing else of ours."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def hello_app() -> Starlette:
    """The app, for uvicorn as a factory (``perf.hello:hello_app``)."""

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    return Starlette(routes=[Route("/", hello)])
