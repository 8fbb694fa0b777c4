"""A real sandboxd-mcp for tests and the benchmark, driven by the official SDK's own client.

Over stdio the SDK's ``stdio_client`` starts it (under ``setpriv`` as the unprivileged test
user sbx-mcp, a member of the socket's group); over HTTP ``McpHttpProcess`` starts it like
tests/bridge.py starts sandboxd-http (READY=1 with the port on its NOTIFY_SOCKET) and the
SDK's ``streamable_http_client`` talks to it on 127.0.0.1.  Needs the SDK: run under
.venv-mcp (make dev).
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from bridge import BridgeProcess
from harness import REPO
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

USER = "sbx-mcp"
TOKEN = "sbx-mcp-test-token-0123456789"
SETPRIV = "/usr/bin/setpriv"


def as_user_command(user: str = USER) -> list[str]:
    return [SETPRIV, f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def server_env(**extra: str) -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": REPO, **extra}


def stdio_params(socket_path: str, *args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    command = [*as_user_command(), sys.executable, "-m", "sandboxd.mcp", "--socket", socket_path, *args]
    return StdioServerParameters(command=command[0], args=command[1:], env=server_env(**(env or {})), cwd="/")


@contextlib.asynccontextmanager
async def stdio_session(socket_path: str, errlog: Any = None) -> AsyncIterator[ClientSession]:
    log = errlog or open(os.devnull, "w")  # noqa: SIM115 -- closed below
    try:
        async with stdio_client(stdio_params(socket_path), errlog=log) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session
    finally:
        if errlog is None:
            log.close()


def http_client(token: str | None = TOKEN, **headers: str) -> httpx2.AsyncClient:
    # trust_env=False: a proxy in the environment must never carry a test's request off loopback
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.AsyncClient(headers={**auth, **headers}, trust_env=False,
                              timeout=httpx2.Timeout(30.0, read=120.0))


@contextlib.asynccontextmanager
async def http_session(url: str, token: str | None = TOKEN) -> AsyncIterator[ClientSession]:
    async with http_client(token) as hc, streamable_http_client(url, http_client=hc) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


class McpHttpProcess(BridgeProcess):
    """sandboxd-mcp --http on 127.0.0.1 (a free port), as the test user sbx-mcp."""

    def __init__(self, daemon_socket: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        super().__init__(daemon_socket, env={"SANDBOXD_MCP_TOKENS": TOKEN, "PYTHONPATH": REPO, **(env or {})},
                         args=args, user=USER, key=None)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sandboxd.mcp", "--socket", self.daemon_socket, "--http", "127.0.0.1:0",
                *self.args]

    def __enter__(self) -> McpHttpProcess:
        self.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"{self.url}/mcp"


def text_of(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def images_of(result: Any) -> list[tuple[str, bytes]]:
    return [(c.mime_type, base64.b64decode(c.data)) for c in result.content if c.type == "image"]
