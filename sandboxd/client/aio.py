"""The asyncio client: one connection, one request at a time, methods made from ``ops``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..common import protocol
from . import ops
from .ops import MAX_RESPONSE, Exchange, NotSentError, Request, SandboxdError, default_socket

P = ParamSpec("P")
T = TypeVar("T")


def method(op: Callable[P, Request[T]]) -> Callable[Concatenate[AsyncClient, P], Awaitable[T]]:
    """``await AsyncClient.NAME(...)``: the request ``op(...)`` describes, performed."""
    async def perform(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.perform(op(*args, **kwargs))
    perform.__name__, perform.__doc__ = op.__name__, op.__doc__
    return perform


def session_method(op: Callable[Concatenate[str, P], Request[T]],
                   ) -> Callable[Concatenate[AsyncSession, P], Awaitable[T]]:
    """``await AsyncSession.NAME(...)``: the request ``op(session_id, ...)`` describes."""
    async def perform(self: AsyncSession, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.client.perform(op(self.id, *args, **kwargs))
    perform.__name__, perform.__doc__ = op.__name__, op.__doc__
    return perform


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

    async def perform(self, request: Request[T]) -> T:
        """Send one request and read until its answer (interim frames go where it says).

        ``NotSentError`` means the request never went out whole (the daemon had closed
        the connection): sending it again on a new connection cannot run it twice.
        """
        assert self.reader is not None and self.writer is not None
        async with self._lock:  # one request at a time on this connection
            if self.reader.at_eof():
                raise NotSentError("the daemon had closed the connection")
            try:
                self.writer.write(protocol.encode(request.frame(next(self._ids))))
                await self.writer.drain()
            except OSError as e:
                raise NotSentError(f"the daemon had closed the connection ({e})") from e
            exchange = Exchange(request)
            while not exchange.take(await self._frame()):
                pass
        assert exchange.answer is not None
        return request.result(exchange.answer)

    async def _frame(self) -> Any:
        assert self.reader is not None
        while (frame := self.decoder.next_frame()) is None:
            chunk = await self.reader.read(min(max(self.decoder.wanted(), 1), 1 << 20))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.decoder.feed(chunk)
        return frame

    call = method(ops.call)
    hello = method(ops.hello)
    status = method(ops.status)
    run = method(ops.run)
    kill = method(ops.kill)
    jobs = method(ops.jobs)
    usage = method(ops.usage)
    root_why = method(ops.root_why)
    environments = method(ops.environments)
    build_environment = method(ops.build_environment)
    reload = method(ops.reload)
    drain = method(ops.drain)
    undrain = method(ops.undrain)
    sessions = method(ops.sessions)

    async def session(self, **options: Any) -> AsyncSession:
        """Open a session (``async with await c.session() as s: ...`` closes it at the end)."""
        return AsyncSession(self, await self.perform(ops.session_open(**options)))


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

    exec = session_method(ops.session_exec)
    write_file = session_method(ops.session_write_file)
    read_file = session_method(ops.session_read_file)
    list_files = session_method(ops.session_list_files)

    async def interrupt(self) -> bool:
        """KeyboardInterrupt in the running cell, over a connection of its own."""
        async with AsyncClient(self.client.path) as other:
            return await other.perform(ops.session_interrupt(self.id))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.client.perform(ops.session_close(self.id))
            except SandboxdError as e:
                if e.code != "not_found":
                    raise
