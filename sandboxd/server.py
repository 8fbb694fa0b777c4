"""Connections: accept, identify the peer, read frames, dispatch, write responses.

A connection carries requests one after another.  While a request is handled the
next frame header is already being awaited, so a client that disconnects mid-run is
noticed at once and its run cancelled (which kills it).  Bounds: connections in
total and per uid, an idle timeout between requests, a read timeout once a frame
has started, a write timeout for clients that never read, and a global budget for
request bytes held in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from . import errors, protocol
from .config import DaemonSettings
from .errors import RequestError
from .peer import PeerCred, peer_credentials

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
Dispatch = Callable[[PeerCred, dict[str, Any], Progress], Awaitable[dict[str, Any]]]


class ByteBudget:
    """Bytes of request frames held at once, across all connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Server:
    def __init__(self, settings: DaemonSettings, dispatch: Dispatch) -> None:
        self.settings = settings
        self.dispatch = dispatch
        self.budget = ByteBudget(settings.buffer_budget)
        self.connections = 0
        self.by_uid: collections.Counter[int] = collections.Counter()
        self.accepting = True
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_unix_server(self._accepted, sock=sock,
                                                      limit=64 * 1024)

    def configure(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.budget.limit = settings.buffer_budget

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self.server is not None:
            self.server.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        sock: socket.socket = writer.get_extra_info("socket")
        cred = peer_credentials(sock)
        try:
            if cred is None:
                await self._refuse(writer, errors.FORBIDDEN, "no peer credentials on this connection")
                return
            if not self.accepting:
                await self._refuse(writer, errors.UNAVAILABLE, "the daemon is shutting down")
                return
            s = self.settings
            if self.connections >= s.max_connections:
                await self._refuse(writer, errors.BUSY, f"too many connections ({s.max_connections})")
                return
            if self.by_uid[cred.uid] >= s.max_connections_per_uid:
                await self._refuse(writer, errors.QUOTA_EXCEEDED,
                                   f"uid {cred.uid} has {self.by_uid[cred.uid]} connections open; the limit is "
                                   f"{s.max_connections_per_uid}", limit="connections", retry_after_ms=1000)
                return
            self.connections += 1
            self.by_uid[cred.uid] += 1
            try:
                await Connection(self, cred, reader, writer).run()
            finally:
                self.connections -= 1
                self.by_uid[cred.uid] -= 1
                if self.by_uid[cred.uid] <= 0:
                    del self.by_uid[cred.uid]
        except Exception:
            log.exception("connection from %s failed", cred)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self.tasks.discard(task)

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, message: str, **details: Any) -> None:
        writer.write(protocol.encode(protocol.error(None, code, message, **details)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 1.0)


class Connection:
    def __init__(self, server: Server, cred: PeerCred, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.cred = cred
        self.reader = reader
        self.writer = writer

    async def _header(self, timeout: float | None) -> bytes | None:
        """The next 4-byte header; None at a clean EOF between frames."""
        # asyncio.timeout rather than wait_for: no task per read (tens of us per request).
        try:
            async with asyncio.timeout(timeout):
                first = await self.reader.read(1)
        except TimeoutError:
            return None
        if not first:
            return None
        async with asyncio.timeout(self.server.settings.read_timeout):
            return first + await self.reader.readexactly(protocol.HEADER.size - 1)

    async def run(self) -> None:
        s = self.server.settings
        pending: asyncio.Task[bytes | None] | None = None
        while True:
            try:
                if pending is not None:
                    async with asyncio.timeout(s.idle_timeout):
                        header = await pending
                else:
                    header = await self._header(s.idle_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            pending = None
            if header is None:
                return
            try:
                n = protocol.frame_length(header, s.max_frame)
            except protocol.ProtocolError as e:
                await self._send(protocol.error(None, e.code, e.message, **e.details))
                return
            if not self.server.budget.take(n):
                await self._send(protocol.error(None, errors.BUSY, "the daemon holds too many request bytes; "
                                                "retry later", retry_after_ms=500))
                return
            try:
                try:
                    async with asyncio.timeout(s.read_timeout):
                        body = await self.reader.readexactly(n)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                response, pending = await self._handle(body)
                del body
            finally:
                self.server.budget.give(n)
            if response is None:
                return
            if not await self._send(response):
                return

    async def _handle(self, body: bytes) -> tuple[dict[str, Any] | None, asyncio.Task[bytes | None] | None]:
        """Decode and dispatch one frame while watching for the next header (or EOF)."""
        try:
            request = protocol.decode_body(body, self.server.settings.max_frame)
        except protocol.ProtocolError as e:
            return protocol.error(None, e.code, e.message, **e.details), None
        if not isinstance(request, dict):
            return protocol.error(None, errors.BAD_FRAME, "a frame must hold one msgpack map"), None
        rid = request.get("id")
        if not _valid_id(rid):
            return protocol.error(None, errors.BAD_REQUEST, "id: expected a scalar (nil, boolean, number, or "
                                  "a string or bytes of at most 256)", field="id"), None
        work = asyncio.get_running_loop().create_task(self._dispatch(request))
        watch = asyncio.get_running_loop().create_task(self._header(None))
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch in done and not work.done():
            exc = watch.exception()
            if exc is not None or watch.result() is None:
                # The client hung up (or broke its framing) while its request was in flight.
                log.info("uid %d went away during %s %s; cancelling it", self.cred.uid, request.get("op"), rid)
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                return None, None
        response = await work
        return response, watch

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        rid = request.get("id")

        def progress(info: dict[str, Any]) -> None:
            """An interim frame for this request: ``{"id": ..., "progress": {...}}`` (no "ok")."""
            if not self.writer.is_closing():
                self.writer.write(protocol.encode({"id": rid, "progress": info}))

        try:
            return await self.server.dispatch(self.cred, request, progress)
        except RequestError as e:
            return protocol.error(rid, e.code, e.message, **e.details)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("internal error handling %s from uid %d", request.get("op"), self.cred.uid)
            return protocol.error(rid, errors.INTERNAL, f"internal error: {type(e).__name__}")

    async def _send(self, response: dict[str, Any]) -> bool:
        try:
            self.writer.write(protocol.encode(response))
            if self.writer.transport.get_write_buffer_size():  # the usual case: all sent already
                async with asyncio.timeout(self.server.settings.write_timeout):
                    await self.writer.drain()
            return True
        except (TimeoutError, ConnectionError, OSError):
            return False


def _valid_id(rid: Any) -> bool:
    """Request ids are echoed back: any scalar (nil, bool, number, string or bytes up to 256)."""
    if rid is None or isinstance(rid, (bool, int, float)):
        return True
    return isinstance(rid, (str, bytes)) and len(rid) <= 256
