"""The balancer's routes, as Starlette routes any front process mounts (no key: they say
nothing about runs, and a balancer or kubelet carries none).

    GET /health/live     200 while the process serves, draining or not (a restart would not help)
    GET /health/ready    200 when new work may come here; 503 with the reasons otherwise
    GET /capacity        200, JSON: workers, running, queued, free, ready workers per runtime,
                         sessions, draining, ready (and why not), the agent's word

``/health`` (Dify's) stays the bridge's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .node import Node, agent_line

LIVE, READY, CAPACITY = "/health/live", "/health/ready", "/capacity"
PATHS = (LIVE, READY, CAPACITY)
Answered = Callable[[str, int, float], None]  # (route, status, seconds): the process's metrics


def routes(node: Node, answered: Answered | None = None) -> list[Route]:
    def route(path: str, body: Callable[[], Any]) -> Route:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            status, content = await body()
            if answered is not None:
                answered(path, status, time.perf_counter() - started)
            return JSONResponse(content, status, headers={"Cache-Control": "no-store"})

        return Route(path, endpoint, methods=["GET"])

    async def live() -> tuple[int, dict[str, Any]]:
        return 200, {"status": "live", "draining": node.drain.draining}

    async def ready() -> tuple[int, dict[str, Any]]:
        view = await node.view()
        if view.ready:
            return 200, {"status": "ready", "capacity": view.capacity}
        return 503, {"status": "not_ready", "reasons": view.not_ready, "capacity": view.capacity}

    async def capacity() -> tuple[int, dict[str, Any]]:
        view = await node.view()
        return 200, {**view.capacity, "ready": view.ready, "not_ready": view.not_ready,
                     "agent": agent_line(view).strip(), "sandboxd": view.version}

    return [route(LIVE, live), route(READY, ready), route(CAPACITY, capacity)]
