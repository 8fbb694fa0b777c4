"""Non-blocking pipe I/O on the event loop: capped readers, abandonable writers, frames."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from .. import protocol

CHUNK = 1 << 16


class CappedReader:
    """Collects a pipe until EOF, keeping at most ``cap`` bytes; calls ``on_overflow`` once."""

    def __init__(self, fd: int, cap: int, on_overflow: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.cap = cap
        self.buf = bytearray()
        self.truncated = False
        self.on_overflow = on_overflow
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            room = self.cap - len(self.buf)
            if len(chunk) > room:
                self.buf += chunk[:room]
                if not self.truncated:
                    self.truncated = True
                    if self.on_overflow:
                        self.on_overflow()
                # keep draining so writers are not blocked, but keep nothing more
            else:
                self.buf += chunk

    def finish(self) -> None:
        """Take what the pipe holds now and stop reading, without waiting for EOF."""
        if self.fd >= 0:
            self._readable()
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.done.done():
            self.done.set_result(None)


class FrameReader:
    """Reads length-prefixed frames from a pipe; ``frames`` queue ends with None at EOF."""

    def __init__(self, fd: int, max_frame: int) -> None:
        self.fd = fd
        self.decoder = protocol.FrameDecoder(max_frame)
        self.loop = asyncio.get_running_loop()
        self.frames: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()
        self.error: str | None = None
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self.decoder.feed(chunk)
            try:
                while (obj := self.decoder.next_frame()) is not None:
                    if isinstance(obj, dict):
                        self.frames.put_nowait(obj)
            except protocol.ProtocolError as e:
                self.error = e.message
                self.close()
                return

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            self.frames.put_nowait(None)


class Writer:
    """Writes a buffer to a pipe without blocking the loop and closes it; ``abandon`` stops early."""

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.view = memoryview(data)
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[bool] = self.loop.create_future()
        os.set_blocking(fd, False)
        self._write()

    def _write(self) -> None:
        while self.view:
            try:
                n = os.write(self.fd, self.view[:CHUNK * 4])
            except BlockingIOError:
                self.loop.add_writer(self.fd, self._writable)
                return
            except OSError:
                self._finish(False)
                return
            self.view = self.view[n:]
        self._finish(True)

    def _writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self._write()

    def _finish(self, complete: bool) -> None:
        if not self.done.done():
            self.done.set_result(complete)
        self.abandon()

    def abandon(self) -> None:
        if self.fd >= 0:
            self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.done.done():
            self.done.set_result(False)
