"""Slow and oversized clients, held off where uvicorn's parser leaves them (THREATS 24).

uvicorn (httptools) parses; this subclass of its protocol adds what it does not bound:

    header_timeout   the request line and headers must be complete this long after the
                     connection opened (or after the first byte of the next request on a
                     kept-alive connection): a slowloris client gets 408 and is closed
    max_head         bytes of request line and headers (counted as they arrive): 431
    write_timeout    a client that stops reading its response for this long is cut off

When a head is complete and its body still missing, the connection acknowledges at once
(TCP_QUICKACK): a client that sends the body in a write of its own would otherwise wait
for the kernel's delayed acknowledgement, 40 ms a request (measured with httpx).

Bodies are bounded by the app (size and time: ``app.read_body``); idle kept-alive
connections by uvicorn's own keep-alive timeout.

Which connections may stay open is the ``gate``'s to say (uvicorn's ``limit_concurrency``
counted a connection still sending its head like any other): this protocol tells it when a
connection opens, completes a head (with the key or without: ``keys``), goes idle, gets busy
and closes, and closes the ones it is told to.  A head the gate has no room for is answered
503 in Dify's envelope (``Retry-After: 1``, closed) instead of reaching the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import dify
from .gate import Gate
from .keys import Keys

log = logging.getLogger("sandboxd.http")
MAX_HEAD = 64 << 10


def _plain(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()


ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def unavailable(message: str) -> ASGI:
    """An ASGI app answering 503 in Dify's envelope and closing the connection."""
    body = json.dumps(dify.failure(503, message), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


NO_ROOM = unavailable("too many connections: sandboxd-http has no room for this request (max_connections); retry")


def protocol_class(header_timeout: float, write_timeout: float, gate: Gate, keys: Keys) -> type[asyncio.Protocol]:
    class GuardedProtocol(HttpToolsProtocol):  # type: ignore[misc]
        app: Any  # uvicorn's: the ASGI app the next request's cycle runs

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle = False
            self._in_head = True  # the bytes arriving are a request line and headers
            self._head_bytes = 0
            self._write_timer: asyncio.TimerHandle | None = None
            self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(header_timeout, self._too_slow)
            sock = transport.get_extra_info("socket")
            self._sock = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None
            gate.opened(self, self.client[0] if self.client else None)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:  # the next request on a kept-alive connection
                self._head_timer = self.loop.call_later(header_timeout, self._too_slow)

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            self._in_head, self._head_bytes = False, 0
            given = next((value for name, value in self.headers if name == b"x-api-key"), None)
            if gate.head(self, keys.accepts(given)):
                super().on_headers_complete()
                return
            # uvicorn picks the app for this request from self.app as it makes the request's cycle
            served, self.app = self.app, NO_ROOM
            try:
                super().on_headers_complete()
            finally:
                self.app = served

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._idle = True
                gate.idle(self)

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._idle:
                self._idle = False
                gate.busy(self)
            # Counted as they arrive: the parser (and httptools inside it) keeps a header it has
            # not finished, so a bound on finished headers alone would not bound memory.
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if not self._in_head and self._sock is not None:
                # The head is in and the body is not: acknowledge now.  A client that writes the two
                # apart without TCP_NODELAY (httpx, so Dify) holds the body back until the head is
                # acknowledged, and the kernel would delay that acknowledgement by 40 ms.
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if self._in_head and self._head_bytes > MAX_HEAD and not self.transport.is_closing():
                log.warning("%s: request head over %d bytes: refused", self._peer(), MAX_HEAD)
                self._refuse("431 Request Header Fields Too Large")

        def _too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.debug("%s: request head not complete within %g s: closed", self._peer(), header_timeout)
                gate.note("slow_head")
                self._refuse("408 Request Timeout")

        def shed(self, status: str | None) -> None:
            """The gate closes this connection to make room (it has forgotten it already)."""
            if self.transport.is_closing():
                return
            log.debug("%s: closed to make room (%s)", self._peer(), status or "idle")
            if status is None:
                self._cancel_head_timer()
                self.transport.close()
            else:
                self._refuse(status)

        def _refuse(self, status: str) -> None:
            self._cancel_head_timer()
            self.transport.write(_plain(status))
            self.transport.close()

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _stalled(self) -> None:
            self._write_timer = None
            log.info("%s: did not take its response within %g s: cut off", self._peer(), write_timeout)
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            gate.closed(self)
            self._cancel_head_timer()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

        def _peer(self) -> str:
            client = self.client
            return f"{client[0]}:{client[1]}" if client else "client"

    return GuardedProtocol
