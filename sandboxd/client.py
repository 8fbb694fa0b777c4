"""Clients for the sandboxd socket: synchronous and asyncio.

    from sandboxd.client import Client
    with Client() as c:
        result = c.run("print(1)", timeout_ms=2000)
        print(result["status"], result["stdout"])
        with c.session() as s:          # a worker that keeps its state between execs
            s.exec("x = 41")
            print(s.exec("x + 1")["value"])   # '42'

``on_output=callback`` on ``run`` and ``exec`` streams the output: the callback gets
``(stream, data)`` as it arrives ("stdout"/"stderr", bytes); the result still holds all
of it.

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
RUN_OPTIONS = ("language", "stdin", "timeout_ms", "cpu_ms", "memory_mb", "network", "files", "env", "max_output",
               "display", "environment")
SESSION_OPTIONS = ("language", "memory_mb", "cpu_ms", "idle_timeout_ms", "max_lifetime_ms", "network", "files", "env",
                   "display", "environment")
EXEC_OPTIONS = ("stdin", "timeout_ms", "files", "max_output", "display")
Output = Callable[[str, bytes], None]  # (stream, data) of streamed output


def default_socket() -> str:
    return os.environ.get("SANDBOXD_SOCKET") or DEFAULT_SOCKET


class SandboxdError(Exception):
    """The daemon answered with an error (``code`` is one of the protocol's codes)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


def _unwrap(response: Any) -> dict[str, Any]:
    if not isinstance(response, dict):
        raise SandboxdError("bad_frame", "the daemon sent something other than a map")
    if not response.get("ok"):
        err = response.get("error") or {}
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        raise SandboxdError(str(err.get("code", "internal")), str(err.get("message", "")), details)
    return response


def _request(what: str, allowed: tuple[str, ...], options: dict[str, Any], **fields: Any) -> dict[str, Any]:
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    return {**fields, **{k: v for k, v in options.items() if v is not None}}


def _run_request(code: str, options: dict[str, Any]) -> dict[str, Any]:
    return _request("run", RUN_OPTIONS, options, code=code)


def _is_event(frame: Any) -> bool:
    return isinstance(frame, dict) and "event" in frame and frame.get("ok") is True


def _deliver(frame: dict[str, Any], on_output: Output | None) -> None:
    if on_output is not None and frame.get("event") == "output":
        on_output(str(frame.get("stream")), bytes(frame.get("data") or b""))


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
             on_output: Output | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer; interim ``progress`` frames go to ``progress``,
        streamed output (with ``on_output``, which asks for it) to ``on_output``."""
        rid = next(self._ids)
        if progress is not None:
            fields["progress"] = True  # ask for interim frames
        if on_output is not None:
            fields["stream"] = True
        self.send({"op": op, "id": rid, **fields})
        while True:
            frame = self.receive()
            if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
                if progress is not None:
                    progress(frame["progress"])
                continue
            if _is_event(frame):
                _deliver(frame, on_output)
                continue
            return _unwrap(frame)

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def run(self, code: str, *, on_output: Output | None = None, **options: Any) -> dict[str, Any]:
        """Run ``code``; return the result record (status, stdout, stderr, ...)."""
        result: dict[str, Any] = self.call("run", on_output=on_output, **_run_request(code, options))["result"]
        return result

    def session(self, **options: Any) -> Session:
        """Open a session (``with c.session() as s: ...`` closes it at the end)."""
        info = self.call("session_open", **_request("session", SESSION_OPTIONS, options))["session"]
        return Session(self, info)

    def sessions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("sessions")["sessions"]
        return found


class Session:
    """A session of a ``Client``: its execs go over that client's connection, one at a time."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self.client = client
        self.info = info
        self.id: str = info["session_id"]
        self.closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, code: str, *, on_output: Output | None = None, **options: Any) -> dict[str, Any]:
        """Run a cell; the result has ``status`` ("ok", "exception", ...), ``value``, ``exception``..."""
        request = _request("exec", EXEC_OPTIONS, options, session_id=self.id, code=code)
        result: dict[str, Any] = self.client.call("session_exec", on_output=on_output, **request)["result"]
        return result

    def interrupt(self) -> bool:
        """KeyboardInterrupt in the running cell (over a connection of its own: this one may be
        waiting for that very cell).  False if nothing was running."""
        with Client(self.client.path, timeout=10) as other:
            return bool(other.call("session_interrupt", session_id=self.id)["interrupted"])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.client.call("session_close", session_id=self.id)
            except SandboxdError as e:
                if e.code != "not_found":  # it ended on its own already
                    raise


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

    async def call(self, op: str, on_output: Output | None = None, **fields: Any) -> dict[str, Any]:
        assert self.reader is not None and self.writer is not None
        if on_output is not None:
            fields["stream"] = True
        async with self._lock:  # one request at a time on this connection
            self.writer.write(protocol.encode({"op": op, "id": next(self._ids), **fields}))
            await self.writer.drain()
            while True:
                frame = await self._frame()
                if _is_event(frame):
                    _deliver(frame, on_output)
                    continue
                if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
                    continue
                return _unwrap(frame)

    async def _frame(self) -> Any:
        assert self.reader is not None
        while (frame := self.decoder.next_frame()) is None:
            chunk = await self.reader.read(min(max(self.decoder.wanted(), 1), 1 << 20))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.decoder.feed(chunk)
        return frame

    async def run(self, code: str, *, on_output: Output | None = None, **options: Any) -> dict[str, Any]:
        result: dict[str, Any] = (await self.call("run", on_output, **_run_request(code, options)))["result"]
        return result

    async def session(self, **options: Any) -> AsyncSession:
        """Open a session (``async with await c.session() as s: ...`` closes it at the end)."""
        info = (await self.call("session_open", **_request("session", SESSION_OPTIONS, options)))["session"]
        return AsyncSession(self, info)


class AsyncSession:
    """A session of an ``AsyncClient``."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        self.client = client
        self.info = info
        self.id: str = info["session_id"]
        self.closed = False

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def exec(self, code: str, *, on_output: Output | None = None, **options: Any) -> dict[str, Any]:
        request = _request("exec", EXEC_OPTIONS, options, session_id=self.id, code=code)
        result: dict[str, Any] = (await self.client.call("session_exec", on_output, **request))["result"]
        return result

    async def interrupt(self) -> bool:
        """KeyboardInterrupt in the running cell, over a connection of its own."""
        async with AsyncClient(self.client.path) as other:
            return bool((await other.call("session_interrupt", session_id=self.id))["interrupted"])

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.client.call("session_close", session_id=self.id)
            except SandboxdError as e:
                if e.code != "not_found":
                    raise
