"""Streamed output: a run's or cell's stdout and stderr as ``output`` events while it runs.

Chunks are coalesced for a moment (or up to COALESCE_BYTES) and sent in the order
they were read, one event per stretch of one stream.  Backpressure: once more than
HIGH_WATER bytes sent are not yet taken by the client, the pipes are no longer read
(the run blocks on a full pipe, and its clocks keep running) until the client catches
up; a client that takes nothing for the write timeout has its run ended as if it had
gone away.  So a client that reads slowly slows only itself, and the daemon holds at
most HIGH_WATER plus two pipe buffers per streamed request -- on top of the capped
output the final result carries, as without streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

COALESCE_SECONDS = 0.005
COALESCE_BYTES = 64 << 10
HIGH_WATER = 256 << 10


class EventSink(Protocol):
    """Where a request's interim events go (the server's connection implements it)."""

    def send(self, event: dict[str, Any]) -> None: ...  # one frame, written at once
    def backlog(self) -> int: ...  # bytes written and not yet taken by the client
    async def drained(self) -> None: ...  # until the client took most of it; raises if it does not


class Pausable(Protocol):
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class Streamer:
    def __init__(self, sink: EventSink, readers: Sequence[Pausable], stalled: Callable[[], None]) -> None:
        self.sink = sink
        self.readers = readers
        self.stalled = stalled
        self.pending: list[tuple[str, bytearray]] = []
        self.pending_bytes = 0
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.waiting: asyncio.Task[None] | None = None

    def sink_for(self, stream: str) -> Callable[[bytes], None]:
        return lambda chunk: self.push(stream, chunk)

    def push(self, stream: str, chunk: bytes) -> None:
        if self.pending and self.pending[-1][0] == stream:
            self.pending[-1][1].extend(chunk)
        else:
            self.pending.append((stream, bytearray(chunk)))
        self.pending_bytes += len(chunk)
        if self.pending_bytes >= COALESCE_BYTES:
            self.send()
        elif self.timer is None:
            self.timer = self.loop.call_later(COALESCE_SECONDS, self.send)

    def send(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for stream, data in self.pending:
            self.sink.send({"event": "output", "stream": stream, "data": bytes(data)})
        self.pending.clear()
        self.pending_bytes = 0
        if self.sink.backlog() > HIGH_WATER and self.waiting is None:
            for reader in self.readers:
                reader.pause()
            self.waiting = self.loop.create_task(self._wait_for_client())

    async def _wait_for_client(self) -> None:
        try:
            await self.sink.drained()
        except (TimeoutError, ConnectionError, OSError):
            self.stalled()  # the client stopped taking its output: end the run as if it went away
            return
        finally:
            self.waiting = None
        for reader in self.readers:
            reader.resume()

    async def finish(self) -> None:
        """Send what is pending and wait until the client has taken it (before the final result)."""
        self.send()
        if self.waiting is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self.waiting)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
