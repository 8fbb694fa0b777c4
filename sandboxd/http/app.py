"""The HTTP routes (Starlette): authentication, bodies, and one answer per request.

    POST /v1/sandbox/run                      X-Api-Key   run code, Dify's envelope
    GET  /v1/sandbox/dependencies?language=   X-Api-Key   packages of the language's environment
    POST /v1/sandbox/dependencies/update      X-Api-Key   rebuild it (the bridge's uid must be a sandboxd admin)
    GET  /v1/sandbox/dependencies/refresh     X-Api-Key   rebuild it and list its packages
    GET  /health                                          200 only when the daemon answers and is ready
    GET  /health/live, /health/ready, /capacity           for load balancers (``sandboxd.fleet.routes``)
    GET  /metrics                                         Prometheus text

While the bridge drains, requests to the API routes are answered 503 (nothing started,
``Connection: close``); those in flight are tracked (``fleet.node.Drain``), and a run cut off
when the drain grace ran out is answered 502.

Keys are compared in constant time (``keys``, the check the connection gate uses too).  Errors carry no key, path
or traceback: an unexpected exception is logged and answered 500 with its type's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..fleet import routes as fleet_routes
from ..fleet.node import Node
from . import dify
from .dify import Refusal
from .keys import Keys
from .metrics import CONTENT_TYPE, Metrics
from .service import Answer, Bridge, draining, refused
from .settings import Settings

log = logging.getLogger("sandboxd.http")
JSON = "application/json"
DRAIN = 1 << 20
Handler = Callable[[Request], Awaitable[Answer]]


def respond(answer: Answer) -> Response:
    body = json.dumps(answer.body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, answer.status, headers=answer.headers, media_type=JSON)


async def read_body(request: Request, cap: int, timeout: float, setting: str = "") -> bytes:
    """The whole body, at most ``cap`` bytes (the ``setting`` that says so), arrived within ``timeout`` seconds.

    A body over the cap is read on (and dropped) for up to ``DRAIN`` more bytes before the
    413, so that a client still writing it reads the answer instead of a reset connection.
    """
    length = request.headers.get("content-length")
    too_large = f"the body is larger than {cap} bytes" + (f" ({setting} of sandboxd-http)" if setting else "")
    if length is not None and (not length.isdigit() or int(length) > cap + DRAIN):
        raise Refusal(413 if length.isdigit() else 400, too_large if length.isdigit() else
                      "Content-Length is not a number")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= cap:
                    chunks.append(chunk)
                elif size > cap + DRAIN:
                    break
    except TimeoutError:
        raise Refusal(408, f"the body did not arrive within {timeout:g} s") from None
    if size > cap:
        raise Refusal(413, too_large)
    return b"".join(chunks)


def build(settings: Settings, bridge: Bridge, metrics: Metrics, keys: Keys, node: Node | None = None) -> Starlette:
    def authorized(request: Request) -> bool:
        given = request.headers.get("x-api-key")
        return keys.accepts(None if given is None else given.encode("latin-1", "replace"))

    drain = bridge.drain

    def route(path: str, handler: Handler, methods: list[str], auth: bool = True, work: bool = True) -> Route:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            with drain.track() if work else contextlib.nullcontext():
                try:
                    if auth and not authorized(request):
                        answer = refused(Refusal(401, "unauthorized: missing or wrong X-Api-Key"))
                    elif work and drain.draining:
                        answer = refused(draining())
                        answer.headers["Connection"] = "close"
                    else:
                        answer = await handler(request)
                except Refusal as r:
                    answer = refused(r)
                    if r.status in (408, 413):  # the rest of the body is not read: no next request to find
                        answer.headers["Connection"] = "close"
                except ClientDisconnect:
                    answer = refused(Refusal(400, "the client went away"))
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not drain.cut or task is None:
                        raise  # the server is going away without a drain: nobody to answer
                    task.uncancel()
                    answer = refused(Refusal(502, f"sandboxd-http stopped: its drain grace of "
                                             f"{settings.drain_grace:g} s ran out before this request was done"))
                    answer.headers["Connection"] = "close"
                except Exception as e:  # one answer per request, whatever went wrong
                    log.exception("%s %s failed", request.method, path)
                    answer = refused(Refusal(500, f"internal error in sandboxd-http ({type(e).__name__}); see its log"))
            metrics.answered(path, answer.status, time.perf_counter() - started)
            return respond(answer)

        return Route(path, endpoint, methods=methods)

    async def run(request: Request) -> Answer:
        body = await read_body(request, bridge.max_body, settings.body_timeout, "max_body")
        answer = await bridge.run(body)
        if answer.verdict:
            metrics.runs.labels(answer.language, answer.verdict).inc()
        return answer

    async def dependencies(request: Request) -> Answer:
        return await bridge.dependencies(request.query_params.get("language"))

    async def update(request: Request) -> Answer:
        body = await read_body(request, 1 << 16, settings.body_timeout)
        language = request.query_params.get("language")
        if body.strip():
            try:
                language = json.loads(body).get("language", language)
            except (ValueError, AttributeError):
                raise dify.bad_request("the body must be a JSON object like {\"language\": \"python3\"}") from None
        return await bridge.dependencies(language, rebuild=True, listed=False)

    async def refresh(request: Request) -> Answer:
        return await bridge.dependencies(request.query_params.get("language"), rebuild=True)

    async def health(request: Request) -> Answer:
        return await bridge.health()

    async def prometheus(request: Request) -> Response:
        started = time.perf_counter()
        st, _ = await bridge.status()
        text = metrics.render(st)
        metrics.answered("/metrics", 200, time.perf_counter() - started)
        return Response(text, 200, media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        metrics.answered("other", status, 0.0)
        words = {404: "no such route", 405: "method not allowed"}.get(status, "refused")
        return respond(refused(Refusal(status, f"{words}: {request.method} {request.url.path[:200]}")))

    routes = [
        route("/v1/sandbox/run", run, ["POST"]),
        route("/v1/sandbox/dependencies", dependencies, ["GET"]),
        route("/v1/sandbox/dependencies/update", update, ["POST"]),
        route("/v1/sandbox/dependencies/refresh", refresh, ["GET"]),
        route("/health", health, ["GET"], auth=False, work=False),
        Route("/metrics", prometheus, methods=["GET"]),
        *fleet_routes.routes(node or Node(bridge.status, bridge.checks, drain), metrics.answered),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {404: not_found, 405: not_found}
    return Starlette(routes=routes, exception_handlers=handlers)
