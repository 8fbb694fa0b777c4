"""Streamable HTTP: the MCP endpoint ``/mcp`` and what stands in front of it.

A request meets, in order:

    uvicorn (h11)   at most max_connections connections and requests (503 beyond); a request head
                    within header_timeout of the connection opening or of its previous answer
                    (``protocol_class``), at most 64 KiB of it
    Guard           the Origin header: absent (not a browser), loopback's or allowed_origins', else
                    403; the Host header (when listening on loopback, or allowed_hosts is set), else
                    421 -- what the spec asks against DNS rebinding; a 2026-07-28 request (no
                    sessions in that era) is answered -32022 naming the handshake versions, on which
                    clients fall back to initialize
    bearer tokens   the SDK's BearerAuthBackend and RequireAuthMiddleware over ``Tokens``: 401
                    without a good one; a session answers only the token that opened it (the SDK's
                    session manager keeps its owner)
    the SDK         StreamableHTTPSessionManager: Mcp-Session-Id sessions (max_sessions, then 503;
                    session_idle_timeout), bodies of at most max_body (413)

``build`` returns a Starlette app; more routes go in its ``routes`` argument and are served
behind the Guard but without a token: ``main`` mounts the load balancer's (``fleet.routes``:
/health/live, /health/ready, /capacity) over ``DaemonStatus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import h11
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp_types import UNSUPPORTED_PROTOCOL_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..client import AsyncClient, SandboxdError
from .settings import LOOPBACK_HOSTS, Settings

log = logging.getLogger("sandboxd.mcp")
MCP_PATH = "/mcp"
MAX_HEAD = 64 << 10
STATUS_TTL = 1.0
STATUS_DEADLINE = 2.0
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "localhost")


class Tokens:
    """The bearer tokens (the SDK's TokenVerifier): each compared in constant time, all of them
    every time, so how long a refusal takes says nothing of how close a guess came."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    async def verify_token(self, token: str) -> AccessToken | None:
        given = token.encode("utf-8", "surrogateescape")
        found = None
        for i, known in enumerate(self._tokens):
            if hmac.compare_digest(given, known):
                found = i
        if found is None:
            return None
        return AccessToken(token=token, client_id=f"token-{found + 1}", scopes=[])


def _matches(value: str, patterns: Sequence[str]) -> bool:
    """``value`` equal to a pattern, or to one ending ``:*`` with any port."""
    return any(value == p or (p.endswith(":*") and value.startswith(p[:-1]) and value[len(p) - 1:].isdigit())
               for p in patterns)


class Guard:
    """Origin and Host checks, and the era this server does not serve (pure ASGI middleware)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        loopback = [f"{scheme}://{host}:*" for scheme in ("http", "https") for host in LOOPBACK_HOSTS]
        loopback += [f"{scheme}://{host}" for scheme in ("http", "https") for host in LOOPBACK_HOSTS]
        self.origins = [*loopback, *settings.allowed_origins]
        host, port = settings.http or ("127.0.0.1", 0)
        self.check_host = bool(settings.allowed_hosts) or host in LOOPBACK_ADDRESSES
        self.hosts = [*(f"{h}:*" for h in LOOPBACK_HOSTS), *LOOPBACK_HOSTS, *settings.allowed_hosts]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not _matches(origin, self.origins):
            log.warning("refused a request from origin %r (not loopback's or in allowed_origins)", origin[:200])
            await _answer(send, 403, {"error": "forbidden", "error_description": "this Origin may not call this "
                                      "server (allowed_origins)"})
            return
        host = headers.get("host", "")
        if self.check_host and not _matches(host, self.hosts):
            log.warning("refused a request for host %r (not loopback's or in allowed_hosts)", host[:200])
            await _answer(send, 421, {"error": "misdirected", "error_description": "this Host is not served here "
                                      "(allowed_hosts)"})
            return
        version = headers.get("mcp-protocol-version")
        if scope["path"] == MCP_PATH and version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            await _answer(send, 400, {"jsonrpc": "2.0", "id": None, "error": {
                "code": UNSUPPORTED_PROTOCOL_VERSION,
                "message": f"protocol version {version[:40]} is not served: sandboxd-mcp keeps state in sessions, "
                           "which only the initialize handshake's versions have",
                "data": {"supported": list(HANDSHAKE_PROTOCOL_VERSIONS), "requested": version[:40]}}})
            return
        await self.app(scope, receive, send)


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def build(settings: Settings, server: Server[Any], routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The app: ``/mcp`` behind the Guard and a token; ``routes`` behind the Guard only."""
    manager = StreamableHTTPSessionManager(
        app=server, json_response=False, stateless=False,
        session_idle_timeout=settings.session_idle_timeout, max_request_body_size=settings.max_body,
        max_sessions=settings.max_sessions)
    endpoint = RequireAuthMiddleware(StreamableHTTPASGIApp(manager), required_scopes=[])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    return Starlette(
        routes=[Route(MCP_PATH, endpoint=endpoint), *routes],
        middleware=[Middleware(Guard, settings=settings),
                    Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(Tokens(settings.tokens)))],
        lifespan=lifespan)


class DaemonStatus:
    """The daemon's ``status`` for the balancer's routes (``fleet.node.Status``): asked at most once
    a second, answered within two, or None and why not."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self._last: tuple[float, dict[str, Any] | None, str] = (-STATUS_TTL, None, "")

    async def __call__(self) -> tuple[dict[str, Any] | None, str]:
        at, st, why = self._last
        if time.monotonic() - at < STATUS_TTL:
            return st, why
        try:
            async with asyncio.timeout(STATUS_DEADLINE), AsyncClient(self.socket) as c:
                st, why = await c.status(), ""
        except TimeoutError:
            st, why = None, f"sandboxd did not answer status within {STATUS_DEADLINE:g} s"
        except (OSError, ConnectionError) as e:
            st, why = None, f"sandboxd is not reachable at {self.socket}: {e}"
        except SandboxdError as e:
            st, why = None, f"sandboxd answered status with {e.code}: {e.message}"
        self._last = (time.monotonic(), st, why)
        return st, why


def protocol_class(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with a deadline for each request head: a connection that has
    not sent one within ``header_timeout`` of opening, or of its previous answer, is closed
    (a slow client must not hold one of max_connections for ever)."""

    class HeadDeadline(H11Protocol):  # type: ignore[misc]  # (Any where uvicorn is Debian's, untyped)
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection from %s: no request head within %g s", self.client, header_timeout)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadDeadline
