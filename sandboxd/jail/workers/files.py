"""A session's file operations as the daemon carries them out: each one a child of the fork
server (``child.files``) that is the session's uid in the session's cgroup.

    report = await FileOps(...).run(plan)   # the child's word: {"ok": true, ...} or {"ok": false, "errno", "at"}

Before a write, what it needs is checked against what the session has left: the free space
of its scratch filesystem and the room under its memory limit (the file's pages will be
the session's) -- a write that does not fit is refused rather than filling the scratch or
making the kernel's OOM killer pick one of the session's processes.  The checks are
advisory (the session runs on meanwhile); the kernel's ENOSPC stays the last word.

The content goes to the child in a sealed memfd, which it copies in the kernel (no buffer of
it in the session's memory); its answer comes back as one frame on a pipe, read from the
loop.  A read's child sends back the fd it opened (checked there: a regular file, within
the size), which the daemon reads itself -- at most ``max_bytes`` and one more, from the
loop (16 MiB of tmpfs take a few milliseconds), so a file the session grows meanwhile is
refused rather than followed.  A child that has not answered within TIMEOUT, or that is
still there when the session ends (``kill_all``), is killed through its pidfd.  The daemon
resolves no path in the session's /work itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
from typing import Any

from ..child.files import MAX_LISTING, FileRequest
from ..kernel.cgroups import WorkerCgroup
from ..spec.plans import FilePlan
from .collect import Scratch
from .fsclient import ForkServerClient, ForkServerError
from .pipes import FrameReader

log = logging.getLogger(__name__)
TIMEOUT = 30.0  # seconds a file operation may take (it takes milliseconds; a frozen cgroup would hold it)
MEMORY_HEADROOM = 4 << 20  # left under a session's memory limit after a write (the child's own pages)
ANSWER_OVERHEAD = 1 << 20  # of a listing's frame
CHUNK = 1 << 20


def answer_bytes(plan: FilePlan) -> int:
    """The most the answer to ``plan`` can hold: a read's file, a listing's entries."""
    return {"read": plan.max_bytes, "list": 2 * MAX_LISTING}.get(plan.action, 0) + ANSWER_OVERHEAD


class FileOps:
    """The file operations of one worker, and the children doing them now."""

    def __init__(self, server: ForkServerClient, uid: int, gid: int, cgroup: WorkerCgroup, scratch: Scratch) -> None:
        self.server, self.uid, self.gid, self.cgroup, self.scratch = server, uid, gid, cgroup, scratch
        self.live: set[int] = set()  # pidfds of the children at work
        self.closed = False

    def room(self, plan: FilePlan, top: int) -> dict[str, Any] | None:
        """Why a write does not fit the session now (a refusal as the child would say it), or None."""
        if plan.action != "write":
            return None
        st = os.fstatvfs(top)
        free = st.f_bavail * st.f_frsize
        if len(plan.content) > free or st.f_favail < len(plan.parts) + 1:
            return {"ok": False, "errno": errno.ENOSPC, "at": len(plan.parts) - 1, "free": free}
        memory = self.cgroup.memory_room()
        if memory is not None and len(plan.content) + MEMORY_HEADROOM > memory:
            return {"ok": False, "errno": errno.ENOMEM, "at": len(plan.parts) - 1,
                    "free": max(0, memory - MEMORY_HEADROOM)}
        return None

    async def run(self, plan: FilePlan) -> dict[str, Any]:
        """Do ``plan``; the child's report, or one of ours: ``errno`` ECANCELED when the session
        ended under it, ETIMEDOUT when it took too long, EAGAIN when it could not be started."""
        if self.closed or self.scratch.top < 0:
            return {"ok": False, "errno": errno.ECANCELED, "at": -1}
        top = os.dup(self.scratch.top)  # ours for this operation, whatever the worker closes meanwhile
        try:
            return await self._run(plan, top)
        finally:
            os.close(top)

    async def _run(self, plan: FilePlan, top: int) -> dict[str, Any]:
        refused = self.room(plan, top)
        if refused is not None:
            return refused
        request = FileRequest(plan.action, plan.parts, self.uid, self.gid, len(self.cgroup.procs_files),
                              size=len(plan.content), mode=plan.mode, parents=plan.parents, max_bytes=plan.max_bytes,
                              recursive=plan.recursive, max_entries=plan.max_entries)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        content = _memfd(plan.content)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        given = [result_w, content, theirs.detach()]
        try:
            given += [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in self.cgroup.procs_files]
            pid, pidfd = await self.server.file_op(request.to_wire(), [top, *given])
        except (OSError, ForkServerError) as e:
            os.close(result_r)
            ours.close()
            log.error("a file operation could not be started: %s", e)
            return {"ok": False, "errno": errno.EAGAIN, "at": -1}
        finally:
            for fd in given:
                os.close(fd)
        self.live.add(pidfd)
        reader = FrameReader(result_r, ANSWER_OVERHEAD + (2 * MAX_LISTING if plan.action == "list" else 0))
        try:
            frame = await asyncio.wait_for(reader.frames.get(), TIMEOUT)
        except TimeoutError:
            log.warning("file operation %s %s (pid %d) took over %.0fs; killed", plan.action, plan.path, pid,
                        TIMEOUT)
            frame = {"ok": False, "errno": errno.ETIMEDOUT, "at": -1}
        finally:
            self._kill(pidfd)  # done or not, nothing of it stays
            self.live.discard(pidfd)
            os.close(pidfd)
            reader.close()
            handed = _handed_fd(ours)
            ours.close()
        try:
            if frame is None:  # it died without a word: the session ended (or killed it)
                return {"ok": False, "errno": errno.ECANCELED, "at": -1, "error": reader.error}
            if frame.get("ok") and frame.pop("fd", None):
                if handed is None:
                    return {"ok": False, "errno": errno.EIO, "at": -1}
                return {**frame, **read_regular(handed, plan.max_bytes, len(plan.parts) - 1)}
            return frame
        finally:
            if handed is not None:
                os.close(handed)

    def kill_all(self) -> None:
        """The session is ending: no operation of it goes on."""
        self.closed = True
        for pidfd in list(self.live):
            self._kill(pidfd)

    @staticmethod
    def _kill(pidfd: int) -> None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _handed_fd(sock: socket.socket) -> int | None:
    """The fd a read's child sent (it sends it before its answer), if any."""
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1, socket.MSG_DONTWAIT)
    except OSError:
        return None
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else None


def read_regular(fd: int, max_bytes: int, at: int) -> dict[str, Any]:
    """The bytes of a regular file the child opened: ``content``, or a refusal (``errno``
    EFBIG) when it holds more than ``max_bytes`` now."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return {"ok": False, "errno": errno.EINVAL, "at": at, "kind": "other"}
    chunks: list[bytes] = []
    got = 0
    while got <= max_bytes:
        chunk = os.pread(fd, min(CHUNK, max_bytes + 1 - got), got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > max_bytes:
        return {"ok": False, "errno": errno.EFBIG, "at": at, "size": got}
    return {"content": b"".join(chunks), "size": got}


def _memfd(content: bytes) -> int:
    """A sealed memfd holding a write's content (an empty one for a read or a listing)."""
    fd = os.memfd_create("sandboxd-file", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE |
                    fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd
