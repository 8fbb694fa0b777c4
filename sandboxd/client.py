"""Clients for the sandboxd socket: synchronous and asyncio.

    from sandboxd.client import Client
    with Client() as c:
        result = c.run("print(1)", timeout_ms=2000)
        print(result["status"], result["stdout"])

Failures raise ``SandboxdError`` carrying the protocol's stable ``code``.  The socket
is ``$SANDBOXD_SOCKET`` or ``/run/sandboxd/sandboxd.sock`` unless given.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable
from typing import Any

from . import protocol

DEFAULT_SOCKET = "/run/sandboxd/sandboxd.sock"
MAX_RESPONSE = protocol.DEFAULT_MAX_FRAME * 4  # a result holds up to twice max_output plus out/ files
RUN_OPTIONS = ("language", "stdin", "timeout_ms", "cpu_ms", "memory_mb", "network", "files", "env", "max_output")


def default_socket() -> str:
    return os.environ.get("SANDBOXD_SOCKET") or DEFAULT_SOCKET


class SandboxdError(Exception):
    """The daemon answered with an error (``code`` is one of the protocol's codes)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class NotSentError(ConnectionError):
    """The connection was closed before the request went out: it did not reach the daemon."""


def _unwrap(response: Any) -> dict[str, Any]:
    if not isinstance(response, dict):
        raise SandboxdError("bad_frame", "the daemon sent something other than a map")
    if not response.get("ok"):
        err = response.get("error") or {}
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        raise SandboxdError(str(err.get("code", "internal")), str(err.get("message", "")), details)
    return response


def _run_request(code: str, options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(RUN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
    return {"code": code, **{k: v for k, v in options.items() if v is not None}}


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = None) -> None:
        self.path = path or default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self._ids = itertools.count(1)
        self.decoder = protocol.FrameDecoder(MAX_RESPONSE)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, request: dict[str, Any]) -> None:
        self.sock.sendall(protocol.encode(request))

    def receive(self) -> Any:
        try:
            return protocol.read_frame(self.sock.recv, self.decoder)
        except EOFError:
            raise ConnectionError("the daemon closed the connection") from None

    def call(self, op: str, progress: Callable[[dict[str, Any]], None] | None = None,
             **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer; interim ``progress`` frames go to ``progress``."""
        rid = next(self._ids)
        if progress is not None:
            fields["progress"] = True  # ask for interim frames
        self.send({"op": op, "id": rid, **fields})
        while True:
            frame = self.receive()
            if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
                if progress is not None:
                    progress(frame["progress"])
                continue
            return _unwrap(frame)

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def run(self, code: str, **options: Any) -> dict[str, Any]:
        """Run ``code``; return the result record (status, stdout, stderr, ...)."""
        result: dict[str, Any] = self.call("run", **_run_request(code, options))["result"]
        return result


class AsyncClient:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_socket()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.decoder = protocol.FrameDecoder(MAX_RESPONSE)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path, limit=1 << 20)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    async def call(self, op: str, progress: Callable[[dict[str, Any]], None] | None = None,
                   **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer; interim ``progress`` frames go to ``progress``.

        ``NotSentError`` means the request never went out whole (the daemon had closed
        the connection): sending it again on a new connection cannot run it twice.
        """
        assert self.reader is not None and self.writer is not None
        if progress is not None:
            fields["progress"] = True
        async with self._lock:  # one request at a time on this connection
            if self.reader.at_eof():
                raise NotSentError("the daemon had closed the connection")
            try:
                self.writer.write(protocol.encode({"op": op, "id": next(self._ids), **fields}))
                await self.writer.drain()
            except OSError as e:
                raise NotSentError(f"the daemon had closed the connection ({e})") from e
            while True:
                while (frame := self.decoder.next_frame()) is None:
                    chunk = await self.reader.read(min(max(self.decoder.wanted(), 1), 1 << 20))
                    if not chunk:
                        raise ConnectionError("the daemon closed the connection")
                    self.decoder.feed(chunk)
                if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
                    if progress is not None:
                        progress(frame["progress"])
                    continue
                return _unwrap(frame)

    async def run(self, code: str, **options: Any) -> dict[str, Any]:
        result: dict[str, Any] = (await self.call("run", **_run_request(code, options)))["result"]
        return result
