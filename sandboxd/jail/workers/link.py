"""What a worker says, read from the daemon's loop: R's link and sandboxd-init's status pipe.

The link is a SOCK_SEQPACKET socket: each message is one kind byte and a body, and the
first ones carry fds (R's seccomp listener, its pidfd, the scratch filesystem's top).  A
burst is read 64 messages at a time so a run sending as fast as we read cannot hold the
loop; fds that come with a message are closed after it unless its handler took them.
The status pipe carries one fixed record, sandboxd-init's account of R's end (wait
status and rusage), then EOF when sandboxd-init exits.  Neither reader interprets what
it reads: that is the worker's state machine (worker.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from ...common.launch import received_fds
from ..child.contract import INIT_MAGIC, INIT_REPORT, MAX_LINK_MESSAGE

MAX_FDS = 3  # what the link's first message carries: listener, R's pidfd, the scratch's top
BURST = 64  # messages read before the loop gets its turn back


class Link:
    """R's end of the link as the daemon reads it: ``on_message(kind, body, fds)`` per message
    (set an fd of the list to -1 to keep it), ``on_closed()`` once, at EOF or an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_message: Callable[[bytes, bytes, list[int]], None], on_closed: Callable[[], None]) -> None:
        self.loop = loop
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._on_message, self._on_closed = on_message, on_closed
        loop.add_reader(fd, self._readable)

    @property
    def open(self) -> bool:
        return self._sock.fileno() >= 0

    def _readable(self) -> None:
        for _ in range(BURST):
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(MAX_LINK_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError:
                data, anc = b"", []
            fds = received_fds(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                self.close()
                return
            try:
                self._on_message(data[:1], data[1:], fds)
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)

    def close(self) -> None:
        """Stop reading (what the run still says is not read) and tell the worker, once."""
        if self.open:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._on_closed()


class InitStatus:
    """The status pipe: ``report`` is sandboxd-init's record once it has come (wstatus,
    utime_us, stime_us, maxrss_kb); ``on_change()`` when it comes and when sandboxd-init
    exits (``fd`` is -1 from then on)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, on_change: Callable[[], None]) -> None:
        self.loop, self.fd = loop, fd
        self.report: dict[str, int] | None = None
        self._buf = bytearray()
        self._on_change = on_change
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 64)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()  # sandboxd-init exited (or pid 1 never got to exec it)
            self._on_change()
            return
        self._buf += chunk
        if len(self._buf) >= INIT_REPORT.size and self.report is None:
            magic, wstatus, utime, stime, maxrss = INIT_REPORT.unpack_from(self._buf)
            if magic == INIT_MAGIC:
                self.report = {"wstatus": wstatus, "utime_us": utime, "stime_us": stime, "maxrss_kb": maxrss}
                self._on_change()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def decode_map(body: bytes) -> dict[str, Any]:
    """A msgpack map of a message's body ({} when it is not one)."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return {}
    return value if isinstance(value, dict) else {}


def decode_timings(body: bytes) -> dict[str, int]:
    return {str(k): v for k, v in decode_map(body).items() if isinstance(v, int)}
