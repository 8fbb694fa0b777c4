"""Connections: accept, identify the peer, read frames, dispatch, write responses.

A connection carries requests one after another.  While a request is handled the
next frame header is already being awaited, so a client that disconnects mid-run is
noticed at once and its run cancelled (which kills it).  Bounds, each so that one
caller cannot take from the others: connections in total and per uid; an idle timeout
between requests, a read timeout once a frame has started, a write timeout for clients
that never read; request bytes held in memory, charged as they arrive, globally and
per uid (``budget``); response bytes not yet taken, per uid -- a uid whose answers pile
up gets no new request read until they are taken.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from typing import Any, Protocol

from . import logs
from .budget import SMALL, Budget
from .common import errors, protocol
from .common.errors import RequestError
from .config import DaemonSettings
from .peer import PeerCred, peer_credentials

log = logging.getLogger(__name__)

# Refusals are logged, at most REFUSAL_LOG_BURST a uid per REFUSAL_LOG_WINDOW seconds (a flood
# of bad requests must not flood the journal); what was left out is counted in the next line.
REFUSAL_LOG_BURST = 20
REFUSAL_LOG_WINDOW = 60.0


class RefusalLog:
    def __init__(self) -> None:
        self.windows: dict[int, tuple[float, int, int]] = {}  # uid -> (window start, logged, left out)

    def log(self, uid: int, op: object, e: RequestError, now: float) -> None:
        start, logged, left_out = self.windows.get(uid, (now, 0, 0))
        if now - start > REFUSAL_LOG_WINDOW:
            start, logged = now, 0
        if logged >= REFUSAL_LOG_BURST:
            self.windows[uid] = (start, logged, left_out + 1)
            return
        self.windows[uid] = (start, logged + 1, 0)
        op_name = str(op)[:40] if isinstance(op, str) else "?"
        more = f" (and {left_out} more refusals not logged)" if left_out else ""
        level = logging.WARNING if e.code == errors.INTERNAL else logging.INFO
        log.log(level, "refused %s from uid %d: %s: %s%s", op_name, uid, e.code, e.message[:300], more,
                extra=logs.fields(caller_uid=uid, op=op_name, refusal=e.code, limit=e.details.get("limit"),
                              field=str(e.details.get("field"))[:64] if e.details.get("field") else None))
        if len(self.windows) > 4096:  # uids come and go: keep the table small
            for key in [k for k, (t, _, _) in self.windows.items() if now - t > REFUSAL_LOG_WINDOW]:
                del self.windows[key]


class Front(Protocol):
    """What the server hands requests to (``handlers.Handlers``)."""

    async def serve(self, cred: PeerCred, req: dict[str, Any], interim: Interim) -> dict[str, Any]: ...
    def refused(self, uid: int) -> None: ...  # a request of this uid was refused before it reached an operation

CHUNK = 1 << 16
ACCEPT_BATCH = 32  # connections accepted per wake-up of the listening socket
ACCEPT_RETRY_DELAY = 1.0  # seconds without accepting after EMFILE/ENFILE/ENOMEM
MAX_REQUEST_ITEMS = 4096  # entries of any one array or map in a request (files: 1,000)
MAX_REQUEST_CONTAINERS = 64  # arrays and maps in one request (a run has 3)


class Server:
    def __init__(self, settings: DaemonSettings, responses: Budget | None = None) -> None:
        self.settings = settings
        self.front: Front | None = None
        self.requests = Budget(settings.buffer_budget, settings.buffer_budget_per_uid)
        # answers written and not yet taken (and, held by Runs, those of runs in flight)
        self.responses = responses or Budget(settings.response_budget, settings.response_budget_per_uid)
        self.connections = 0
        self.by_uid: collections.Counter[int] = collections.Counter()
        self.accepting = True
        self.listener: socket.socket | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.refusals = RefusalLog()

    def refused(self, uid: int) -> None:
        if self.front is not None:
            self.front.refused(uid)

    def log_refusal(self, uid: int, op: object, e: RequestError) -> None:
        self.refusals.log(uid, op, e, asyncio.get_running_loop().time())

    async def serve(self, sock: socket.socket, front: Front) -> None:
        """Accept on ``sock`` from now on and hand requests to ``front``, at most ACCEPT_BATCH
        connections a wake-up: a flood of connects from one caller cannot keep the loop from
        everyone else's requests (libuv's own accept loop, under uvloop, accepts until the
        backlog is empty)."""
        self.front = front
        sock.setblocking(False)
        self.listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_some)

    def configure(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.requests.configure(settings.buffer_budget, settings.buffer_budget_per_uid)
        self.responses.configure(settings.response_budget, settings.response_budget_per_uid)

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self.listener is not None:
            self._pause_accepting()
            self.listener.close()
            self.listener = None

    def _accept_some(self) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of fds or memory: wait a moment rather than spin on it
                log.warning("accept failed (%s); accepting again in %.1f s", e, ACCEPT_RETRY_DELAY)
                self._pause_accepting()
                asyncio.get_running_loop().call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            cred = self._admit(conn)
            if cred is None:
                continue
            self.connections += 1
            self.by_uid[cred.uid] += 1
            task = asyncio.get_running_loop().create_task(self._serve_connection(conn, cred))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _admit(self, conn: socket.socket) -> PeerCred | None:
        """The caller of a new connection, or None once it has been told why not (and closed).
        Refusals cost no task and no transport: the answer is one small frame on an empty socket."""
        cred = peer_credentials(conn)
        s = self.settings
        if cred is None:
            why = protocol.error(None, errors.FORBIDDEN, "no peer credentials on this connection")
        elif not self.accepting:
            why = protocol.error(None, errors.UNAVAILABLE, "the daemon is shutting down")
        elif self.connections >= s.max_connections:
            why = protocol.error(None, errors.BUSY, f"too many connections ({s.max_connections})")
        elif self.by_uid[cred.uid] >= s.max_connections_per_uid:
            why = protocol.error(None, errors.QUOTA_EXCEEDED,
                                 f"uid {cred.uid} has {self.by_uid[cred.uid]} connections open; the limit is "
                                 f"{s.max_connections_per_uid}", limit="connections", retry_after_ms=1000)
        else:
            return cred
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(protocol.encode(why))
        conn.close()
        return None

    def _pause_accepting(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())

    def _resume_accepting(self) -> None:
        if self.listener is not None and self.accepting:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept_some)

    async def _serve_connection(self, conn: socket.socket, cred: PeerCred) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=CHUNK)
            await Connection(self, cred, reader, writer).run()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading: nothing to tell anyone
        except Exception:
            log.exception("connection from %s failed", cred)
        finally:
            self.connections -= 1
            self.by_uid[cred.uid] -= 1
            if self.by_uid[cred.uid] <= 0:
                del self.by_uid[cred.uid]
            if writer is None:
                conn.close()
            else:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)


class Connection:
    def __init__(self, server: Server, cred: PeerCred, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.cred = cred
        self.reader = reader
        self.writer = writer
        self.decoder = protocol.FrameDecoder(server.settings.max_frame)
        self.charged = 0  # request bytes of the current frame, charged to the uid

    async def run(self) -> None:
        s = self.server.settings
        watch: asyncio.Task[bool] | None = None
        try:
            while True:
                # A uid whose answers are not being taken gets nothing more read until they are.
                if self.server.responses.crowded(self.cred.uid):
                    async with asyncio.timeout(s.idle_timeout):
                        await self.server.responses.wait_room(self.cred.uid)
                try:
                    body = await self._next_body(watch)
                except protocol.ProtocolError as e:  # frame_too_large: the stream cannot be trusted
                    self.server.refused(self.cred.uid)
                    await self._send(protocol.error(None, e.code, e.message, **e.details))
                    return
                except RequestError as e:
                    await self._send(protocol.error(None, e.code, e.message, **e.details))
                    return
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                watch = None
                if body is None:
                    return
                try:
                    response, watch = await self._handle(body)
                    del body
                finally:
                    self.server.requests.give(self.cred.uid, self.charged)
                    self.charged = 0
                if response is None or not await self._send(response):
                    return
        finally:
            self.server.requests.give(self.cred.uid, self.charged)
            self.charged = 0
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(BaseException):
                    await watch

    async def _next_body(self, watch: asyncio.Task[bool] | None) -> bytes | None:
        """Read until a whole frame body is in; None at EOF or an idle connection."""
        s = self.server.settings
        loop = asyncio.get_running_loop()
        if watch is not None:  # what the watch read during the last request belongs here
            async with asyncio.timeout(s.idle_timeout):
                if not await watch:
                    return None
        deadline = loop.time() + s.read_timeout if self.decoder.buffered else None
        while (body := self.decoder.next_body()) is None:  # raises frame_too_large once the header is in
            wanted = min(self.decoder.wanted(), CHUNK)
            if deadline is None and self.decoder.buffered == 0:
                timeout: float | None = s.idle_timeout
            else:
                deadline = deadline or loop.time() + s.read_timeout
                timeout = max(0.0, deadline - loop.time())
            if self.decoder.length is not None:
                await self._reserve(wanted, deadline)
            async with asyncio.timeout(timeout):
                chunk = await self.reader.read(wanted)
            if not chunk:
                return None
            if deadline is None:
                deadline = loop.time() + s.read_timeout  # the frame has started
            self.decoder.feed(chunk)
        return body

    async def _reserve(self, n: int, deadline: float | None) -> None:
        """Charge ``n`` body bytes to the uid before reading them (waiting while over budget)."""
        assert self.decoder.length is not None
        small = self.decoder.length <= SMALL
        budget = self.server.requests
        if not budget.fits(self.cred.uid, n, small):
            try:
                async with asyncio.timeout_at(deadline):
                    await budget.reserve(self.cred.uid, n, small)
            except TimeoutError:
                raise RequestError(errors.BUSY, "the daemon holds too many request bytes; retry later",
                                   retry_after_ms=500) from None
        else:
            budget.take(self.cred.uid, n)
        self.charged += n

    async def _fill(self) -> bool:
        """Read what the next frame needs next (its header, at most) into the decoder; False at EOF."""
        chunk = await self.reader.read(max(1, min(self.decoder.wanted(), protocol.HEADER.size)))
        if not chunk:
            return False
        self.decoder.feed(chunk)
        return True

    async def _handle(self, body: bytes) -> tuple[dict[str, Any] | None, asyncio.Task[bool] | None]:
        """Decode and dispatch one frame while watching for the next header (or EOF)."""
        try:
            request = protocol.decode_body(body, self.server.settings.max_frame, max_items=MAX_REQUEST_ITEMS,
                                           max_containers=MAX_REQUEST_CONTAINERS)
        except protocol.ProtocolError as e:
            self.server.refused(self.cred.uid)
            return protocol.error(None, e.code, e.message, **e.details), None
        if not isinstance(request, dict):
            self.server.refused(self.cred.uid)
            return protocol.error(None, errors.BAD_FRAME, "a frame must hold one msgpack map"), None
        rid = request.get("id")
        if not _valid_id(rid):
            self.server.refused(self.cred.uid)
            return protocol.error(None, errors.BAD_REQUEST, "id: expected a scalar (nil, boolean, number, or "
                                  "a string or bytes of at most 256)", field="id"), None
        loop = asyncio.get_running_loop()
        work = loop.create_task(self._dispatch(request))
        watch = loop.create_task(self._fill())
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch in done and not work.done():
            exc = watch.exception()
            if exc is not None or not watch.result():
                # The client hung up (or broke its framing) while its request was in flight.
                log.info("uid %d went away during %s %r; cancelling it", self.cred.uid, request.get("op"), rid)
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                return None, None
        response = await work
        return response, watch

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        rid = request.get("id")
        # No new work for a uid whose answers are not being taken (checked here, when the work
        # would start, not only when its connection last read: connections opened in advance
        # are past that point).  Requests starting together are bounded by its quota instead.
        await self.server.responses.wait_room(self.cred.uid)
        try:
            assert self.server.front is not None
            return await self.server.front.serve(self.cred, request, Interim(self, rid))
        except RequestError as e:
            self.server.log_refusal(self.cred.uid, request.get("op"), e)
            return protocol.error(rid, e.code, e.message, **e.details)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("internal error handling %r from uid %d", request.get("op"), self.cred.uid)
            return protocol.error(rid, errors.INTERNAL, f"internal error: {type(e).__name__}")

    async def _send(self, response: dict[str, Any]) -> bool:
        """Write one response and wait (at most write_timeout) until the client has taken it."""
        data = protocol.encode(response)
        responses = self.server.responses
        n = len(data)
        responses.take(self.cred.uid, n)
        try:
            self.writer.write(data)
            del data
            if self.writer.transport.get_write_buffer_size():  # the usual case: all sent already
                async with asyncio.timeout(self.server.settings.write_timeout):
                    await self.writer.drain()
            return True
        except (TimeoutError, ConnectionError, OSError):
            return False
        finally:
            responses.give(self.cred.uid, n)


class Interim:
    """Frames of one request before its answer: progress reports (``rebuild_root``) and
    streamed events (``stream: true``); the jail's ``EventSink``."""

    def __init__(self, conn: Connection, rid: Any) -> None:
        self.writer = conn.writer
        self.write_timeout = conn.server.settings.write_timeout
        self.rid = rid

    def progress(self, info: dict[str, Any]) -> None:
        """``{"id": ..., "progress": {...}}`` (no "ok": not an answer)."""
        if not self.writer.is_closing():
            self.writer.write(protocol.encode({"id": self.rid, "progress": info}))

    def send(self, event: dict[str, Any]) -> None:
        """``{"id": ..., "ok": true, "event": ..., ...}``: the answer comes after the events."""
        if not self.writer.is_closing():
            self.writer.write(protocol.encode({"id": self.rid, "ok": True, **event}))

    def backlog(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def drained(self) -> None:
        if self.writer.is_closing():
            raise ConnectionError("the client went away")
        async with asyncio.timeout(self.write_timeout):
            await self.writer.drain()


def _valid_id(rid: Any) -> bool:
    """Request ids are echoed back: any scalar (nil, bool, number, string or bytes up to 256)."""
    if rid is None or isinstance(rid, (bool, int, float)):
        return True
    return isinstance(rid, (str, bytes)) and len(rid) <= 256
