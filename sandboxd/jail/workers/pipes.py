"""Non-blocking pipe I/O on the event loop: capped readers, abandonable writers, frames."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from ...common import protocol

CHUNK = 1 << 16
MAX_CHUNKS_AT_ONCE = 16


class CappedReader:
    """Collects a pipe until EOF, keeping at most ``cap`` bytes; calls ``on_overflow`` once.

    ``sink`` sees every kept chunk as it is read (streamed output); ``pause`` and
    ``resume`` stop and restart reading (backpressure: the writer blocks on a full
    pipe meanwhile).  A session reads one pipe for all its cells: ``take`` hands over
    what the current cell wrote and starts counting afresh for the next.
    """

    def __init__(self, fd: int, cap: int, on_overflow: Callable[[], None] | None = None,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.fd = fd
        self.cap = cap
        self.buf = bytearray()
        self.truncated = False
        self.on_overflow = on_overflow
        self.sink = sink
        self.paused = False
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        for _ in range(MAX_CHUNKS_AT_ONCE):  # a writer as fast as we are cannot hold the loop
            if self.fd < 0:
                return
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
                chunk = chunk[:room]
                if not self.truncated:
                    self.truncated = True
                    if self.on_overflow:
                        self.on_overflow()
                # keep draining so writers are not blocked, but keep nothing more
            if chunk:
                self.buf += chunk
                if self.sink is not None:
                    self.sink(chunk)

    def pause(self) -> None:
        if self.fd >= 0 and not self.paused:
            self.loop.remove_reader(self.fd)
        self.paused = True

    def resume(self) -> None:
        if self.fd >= 0 and self.paused:
            self.loop.add_reader(self.fd, self._readable)
        self.paused = False

    def limit(self, cap: int, on_overflow: Callable[[], None] | None) -> None:
        """Keep at most ``cap`` bytes from now on (what is kept stays), calling ``on_overflow``."""
        self.cap, self.on_overflow = cap, on_overflow

    def take(self, cap: int, on_overflow: Callable[[], None] | None = None,
             sink: Callable[[bytes], None] | None = None) -> tuple[bytes, bool]:
        """What was read so far (and is in the pipe now) with its truncation; then start afresh."""
        if self.fd >= 0:
            self._readable()
        got, truncated = bytes(self.buf), self.truncated
        self.buf = bytearray()
        self.truncated = False
        self.cap, self.on_overflow, self.sink = cap, on_overflow, sink
        return got, truncated

    def finish(self) -> None:
        """Take what the pipe holds now and stop reading, without waiting for EOF."""
        if self.fd >= 0:
            self._readable()
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            if not self.paused:
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
    """Writes a buffer to a pipe without blocking the loop and closes it; ``abandon`` stops early.

    ``keep_open``: the fd stays open (and the caller's) when the buffer is written.
    """

    def __init__(self, fd: int, data: bytes, keep_open: bool = False) -> None:
        self.fd = fd
        self.keep_open = keep_open
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
            if not self.keep_open:
                os.close(self.fd)
            self.fd = -1
        if not self.done.done():
            self.done.set_result(False)
