"""stdin and stdout as the event loop's own pipes, for the SDK's stdio transport.

The SDK reads and writes the standard streams in worker threads, several hand-offs a call;
when they are pipes or sockets (what an agent that launches the server gives it), the
event loop can read and write them itself, which is what this module gives ``stdio_server``
(it takes any async line iterator and writer).  A terminal or a file keeps the SDK's way:
making a terminal non-blocking would change it for the shell that shares it.

A line (one JSON-RPC message) longer than ``max_line`` is dropped whole and logged: without
a bound, a client could make this process hold any amount of memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Any

log = logging.getLogger("sandboxd.mcp")


def usable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class Lines:
    """stdin's lines, as text."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self.reader = reader
        self.limit = limit

    def __aiter__(self) -> Lines:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                line = await self.reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    raise StopAsyncIteration from None
                line = e.partial
            except asyncio.LimitOverrunError as e:
                log.warning("dropped a message longer than %d bytes from the client", self.limit)
                await self._skip(e.consumed)
                continue
            return line.decode("utf-8", "replace")

    async def _skip(self, consumed: int) -> None:
        """Drop the rest of an overlong line."""
        while True:
            if consumed:
                await self.reader.readexactly(consumed)
            try:
                await self.reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                consumed = e.consumed
            except asyncio.IncompleteReadError:
                return


class Writer:
    """stdout, written without blocking; ``flush`` waits while the pipe is full."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def write(self, text: str) -> None:
        self.writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self.writer.drain()


async def open_stdio(max_line: int) -> tuple[Any, Any] | None:
    """(lines of stdin, writer of stdout) on the event loop, or None where it cannot be."""
    if not (usable(0) and usable(1)):
        return None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=max_line)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", closefd=False))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                       os.fdopen(1, "wb", closefd=False))
    return Lines(reader, max_line), Writer(asyncio.StreamWriter(transport, protocol, None, loop))
