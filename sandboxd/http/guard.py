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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("sandboxd.http")
MAX_HEAD = 64 << 10


def _plain(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()


def protocol_class(header_timeout: float, write_timeout: float) -> type[asyncio.Protocol]:
    class GuardedProtocol(HttpToolsProtocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._in_head = True  # the bytes arriving are a request line and headers
            self._head_bytes = 0
            self._write_timer: asyncio.TimerHandle | None = None
            self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(header_timeout, self._too_slow)
            sock = transport.get_extra_info("socket")
            self._sock = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:  # the next request on a kept-alive connection
                self._head_timer = self.loop.call_later(header_timeout, self._too_slow)

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
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
                log.info("%s: request head not complete within %g s: closed", self._peer(), header_timeout)
                self._refuse("408 Request Timeout")

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
            self._cancel_head_timer()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

        def _peer(self) -> str:
            client = self.client
            return f"{client[0]}:{client[1]}" if client else "client"

    return GuardedProtocol
