"""The daemon's side of the fork server: start it with exec, ask it for workers.

Replies come back in order, so pending calls are a FIFO of futures; unsolicited
``reaped`` events go to a callback.  The server runs on the root's interpreter
(``/usr/bin/python3`` by default) with an empty environment apart from the
administrator's preload variables.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

import sandboxd

from .contract import WorkerSpec

log = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 20
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(sandboxd.__file__)))


class ForkServerError(Exception):
    pass


@dataclass
class SpawnedWorker:
    pid: int
    pidfd: int
    status_r: int
    request_w: int
    stdin_w: int
    stdout_r: int
    stderr_r: int

    def close(self) -> None:
        for name in ("pidfd", "status_r", "request_w", "stdin_w", "stdout_r", "stderr_r"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass


class ForkServerClient:
    def __init__(self, python: str, env: Mapping[str, str], on_reaped: Callable[[int, int], None]) -> None:
        self.python = python
        self.env = dict(env)
        self.on_reaped = on_reaped
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pending: collections.deque[asyncio.Future[tuple[dict[str, Any], list[int]]]] = collections.deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    async def start(self, init: Mapping[str, Any], root_fd: int) -> dict[str, Any]:
        """Start the server; ``root_fd`` is the root's directory (the server never gets its path)."""
        self.loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bootstrap = (
            f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
            f"from sandboxd.jail.forkserver import main; main({theirs.fileno()})"
        )
        self.proc = subprocess.Popen(
            [self.python, "-I", "-c", bootstrap],
            pass_fds=[theirs.fileno()],
            env=self.env,
            stdin=subprocess.DEVNULL,
            cwd="/",
            close_fds=True,
        )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.loop.add_reader(ours.fileno(), self._readable)
        reply, _ = await self.call(init, fds=[root_fd], timeout=120.0)
        if not reply.get("ok"):
            raise ForkServerError(f"fork server failed to start: {reply.get('error')}")
        return reply

    async def call(self, msg: Mapping[str, Any], fds: Sequence[int] = (),
                   timeout: float = 30.0) -> tuple[dict[str, Any], list[int]]:
        """Send one message (with ``fds`` attached, which stay ours to close) and await its reply."""
        if self.closed or self.sock is None or self.loop is None:
            raise ForkServerError("fork server is not running")
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

    async def spawn(self, spec: WorkerSpec, cgroup_fds: Sequence[int]) -> SpawnedWorker:
        reply, fds = await self.call({"op": "spawn", "spec": spec.to_wire()}, fds=cgroup_fds)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise ForkServerError(str(reply.get("error")))
        if len(fds) != 6:
            for fd in fds:
                os.close(fd)
            raise ForkServerError(f"spawn returned {len(fds)} descriptors, expected 6")
        return SpawnedWorker(reply["pid"], *fds)

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return
            except OSError as e:
                log.error("fork server socket: %s", e)
                data, anc = b"", []
            fds = _fds(anc)
            if not data:
                self._lost()
                return
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if "event" in msg:
                if msg["event"] == "reaped":
                    self.on_reaped(msg["pid"], msg["wstatus"])
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
            log.error("fork server exited unexpectedly (status %s)", self.proc.poll() if self.proc else None)
        self.closed = True
        if self.loop and self.sock:
            self.loop.remove_reader(self.sock.fileno())
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(ForkServerError("fork server exited"))

    @property
    def alive(self) -> bool:
        return not self.closed and self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        self.closed = True
        if self.loop and self.sock:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if self.proc:
            for _ in range(500):  # closing the socket makes it kill its workers and exit
                if self.proc.poll() is not None:
                    return
                await asyncio.sleep(0.01)
            self.proc.kill()
            self.proc.wait()


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds
