"""Helper processes: one way to start them, and the daemon's side of those it talks to.

Every helper (the fork server, the network-namespace maker, the template maker, root and
environment builds) is a fresh interpreter started by ``command`` -- never a fork of the
daemon: ``PYTHON -I -c BOOT MODULE ARGS...`` imports MODULE from this installation and
calls its ``main(ARGS)``.  The fork server and the network helper talk over one
SOCK_SEQPACKET socket (``HelperClient``).  A message is one msgpack
map, possibly with fds attached (SCM_RIGHTS).  Replies come back in order, so pending
calls are a FIFO of futures; unsolicited messages (``{"event": ...}``) go to a callback.
When the daemon goes away the helper's socket reaches EOF (and PDEATHSIG follows).
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import msgpack

log = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 20
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ``-I`` ignores PYTHON* variables and the user's site directory; the package comes from where
# this one was imported, whatever the helper's own sys.path holds.
BOOT = (f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
        "sys.exit(__import__(sys.argv[1], fromlist=['main']).main(sys.argv[2:]))")


def command(python: str, module: str, *args: str) -> list[str]:
    """The command line that runs ``module.main([*args])`` in a fresh ``python``."""
    return [python, "-I", "-c", BOOT, module, *args]


class HelperError(Exception):
    pass


class HelperClient:
    name = "helper"
    module = ""  # the module whose main(fd) the helper runs

    def __init__(self, python: str, env: Mapping[str, str],
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.python = python
        self.env = dict(env)
        self.on_event = on_event or (lambda msg: None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pending: collections.deque[asyncio.Future[tuple[dict[str, Any], list[int]]]] = collections.deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    async def start(self, init: Mapping[str, Any], fds: Sequence[int] = (), timeout: float = 120.0) -> dict[str, Any]:
        """Exec the helper and send it ``init``; its first reply must say ok."""
        self.loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(command(self.python, self.module, str(theirs.fileno())),
                                     pass_fds=[theirs.fileno()], env=self.env, stdin=subprocess.DEVNULL, cwd="/",
                                     close_fds=True)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.loop.add_reader(ours.fileno(), self._readable)
        reply, _ = await self.call(init, fds=fds, timeout=timeout)
        if not reply.get("ok"):
            raise HelperError(f"the {self.name} failed to start: {reply.get('error')}")
        return reply

    async def call(self, msg: Mapping[str, Any], fds: Sequence[int] = (),
                   timeout: float = 30.0) -> tuple[dict[str, Any], list[int]]:
        """Send one message (with ``fds`` attached, which stay ours to close) and await its reply."""
        if self.closed or self.sock is None or self.loop is None:
            raise HelperError(f"the {self.name} is not running")
        fut: asyncio.Future[tuple[dict[str, Any], list[int]]] = self.loop.create_future()
        self.pending.append(fut)
        await self._send(msgpack.packb(msg, use_bin_type=True), fds)
        return await asyncio.wait_for(fut, timeout)

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        assert self.sock is not None and self.loop is not None
        while True:
            try:
                socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = self.loop.create_future()
                self.loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return
            except OSError as e:
                log.error("%s socket: %s", self.name, e)
                data, anc = b"", []
            fds = received_fds(anc)
            if not data:
                self._lost()
                return
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if "event" in msg:
                self.on_event(msg)
                continue
            if self.pending:
                fut = self.pending.popleft()
                if not fut.done():
                    fut.set_result((msg, fds))
                    continue
            for fd in fds:
                os.close(fd)

    def _lost(self) -> None:
        if not self.closed:
            log.error("the %s exited unexpectedly (status %s)", self.name, self.proc.poll() if self.proc else None)
        self.closed = True
        if self.loop and self.sock:
            self.loop.remove_reader(self.sock.fileno())
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(HelperError(f"the {self.name} exited"))

    @property
    def alive(self) -> bool:
        return not self.closed and self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        self.closed = True
        if self.loop and self.sock:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if self.proc:
            for _ in range(500):  # closing the socket makes it end (the fork server kills its workers first)
                if self.proc.poll() is not None:
                    return
                await asyncio.sleep(0.01)
            self.proc.kill()
            self.proc.wait()


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message carried (now the receiver's to close)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


async def output_lines(proc: subprocess.Popen[bytes]) -> AsyncIterator[str]:
    """The lines a child writes on its stdout (a pipe), without threads (asyncio's own
    subprocess support waits for children from a thread in Python 3.11; this daemon has
    one thread).  When the lines end (or the caller stops) the child is killed if it still
    runs, and waited for."""
    loop = asyncio.get_running_loop()
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        queue.put_nowait(chunk)
        if not chunk:
            loop.remove_reader(fd)

    loop.add_reader(fd, readable)
    buf = b""
    try:
        while True:
            chunk = await queue.get()
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")
    finally:
        loop.remove_reader(fd)
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        while proc.poll() is None:  # it closed its output: its exit is a moment away
            await asyncio.sleep(0.005)
