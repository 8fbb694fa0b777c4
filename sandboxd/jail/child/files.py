"""A session's files: one operation on its /work, done by a child of the fork server that is
the session's own uid, in the session's own cgroup.

    daemon -> fork server   {"op": "files", "request": FileRequest} + [top, result_w, content, fd_sock, *cgroup.procs]
    fork server             forks; answers {"ok": true, "pid"} + [pidfd] at once, never waits for it
    the child (``main``)    fds -> signals -> cgroup -> credentials -> the operation -> one frame -> _exit

The child leaves the server's stack behind (``Become``), keeps only the fds above, joins
the session's cgroups -- so the pages of a file it writes are the session's memory, counted
against the session's limit as its own writes are, and its CPU is the session's -- and
drops to the run's uid and gid with no capability left: the kernel checks every access with
the session's own rights, and nothing a run cannot write (a root file, another run's) can
be written.  As root it touches nothing.

Every path is resolved by ``openat2`` beneath the scratch's ``work`` (the session's
/work) with no link of any kind followed, no ``..`` out of it and no mount crossed: a
symbolic link planted by the session, to /etc or anywhere, fails the walk (ELOOP) rather
than being followed; a rename racing the walk can only lead to another place of the same
/work.  A read opens only the final name, non-blocking, and accepts only a regular file
(checked on the open fd: a FIFO or socket planted there is refused, and holds nobody); the
open fd goes back to the daemon (``fd_sock``), which reads it itself: no path is resolved
as root, and no copy of the file is made in the session's memory.  A
write goes to a fresh file (``O_EXCL``, the session's uid, then ``mode``) renamed over the
name: it never writes through a link, into a FIFO or into another name's inode (a hard
link), and a reader never sees half of it.  A name that is a symbolic link is refused for
writing too: no link is followed or replaced.

The daemon decided everything (the components, the sizes, the mode); the child says what
the kernel answered -- ``{"ok": false, "errno", "at"}`` with ``at`` the index of the
component it concerns -- and the daemon words it (``sessionfiles``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..kernel import credentials, libc
from .contract import remap_fds, write_frame

FD_TOP, FD_RESULT, FD_DATA, FD_SOCK, FD_CGROUPS = 3, 4, 5, 6, 7  # where ``main`` puts what it was given
WORK = "work"  # the session's /work, from the scratch's top
# (no O_NOFOLLOW: with O_PATH it would open a final link itself; RESOLVE_NO_SYMLINKS refuses it)
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY
MAX_DEPTH = 16  # directories a recursive listing goes down
MAX_LISTING = 4 << 20  # bytes of entry paths a listing says, then it is truncated
CHUNK = 1 << 20
TYPES = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
         (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char_device"), (stat.S_ISBLK, "block_device"))


@dataclass(frozen=True)
class FileRequest:
    """What the child is told: the operation (``FilePlan`` without its content), and whose."""

    action: str
    parts: tuple[str, ...]
    uid: int
    gid: int
    cgroups: int  # cgroup.procs fds after the first three
    size: int = 0  # the content a write copies from FD_DATA (a sealed memfd)
    mode: int = 0o644
    parents: bool = True
    max_bytes: int = 16 << 20
    recursive: bool = False
    max_entries: int = 10_000

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "parts": list(self.parts)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FileRequest:
        return cls(**{**d, "parts": tuple(str(p) for p in d["parts"])})


class Refused(Exception):
    """What the kernel said to the operation: an errno, and which component (``at``) it concerns."""

    def __init__(self, err: int, at: int, **info: Any) -> None:
        super().__init__(os.strerror(err))
        self.errno, self.at, self.info = err, at, info


def kind(mode: int) -> str:
    return next((name for test, name in TYPES if test(mode)), "other")


def main(wire: dict[str, Any], fds: Sequence[int]) -> None:
    """The child's whole life (it ends in ``os._exit`` by ``clean_stack``)."""
    remap_fds(fds, FD_TOP)  # nothing of the fork server's is left: its socket, other workers' fds
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        request = FileRequest.from_wire(wire)
        for fd in range(FD_CGROUPS, FD_CGROUPS + request.cgroups):
            os.write(fd, b"0")  # this process, into the session's cgroup
            os.close(fd)
        credentials.drop(request.uid, request.gid, libc.cap_last_cap())
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        os.umask(0o022)
    except OSError as e:
        write_frame(FD_RESULT, {"ok": False, "errno": e.errno or errno.EPERM, "at": -1, "setup": str(e)})
        return
    try:
        answer = ACTIONS[request.action](request)
    except Refused as e:
        answer = {"ok": False, "errno": e.errno, "at": e.at, **e.info}
    except Exception as e:  # noqa: BLE001 - a bug here is said as one, not as a session that ended
        answer = {"ok": False, "errno": errno.EIO, "at": -1, "setup": f"{type(e).__name__}: {e}"}
    write_frame(FD_RESULT, answer)


def walk(parts: Sequence[str], create: bool = False) -> int:
    """An O_PATH fd of the directory ``parts`` beneath /work (made when missing, with ``create``)."""
    try:
        fd = libc.openat2(FD_TOP, WORK, PATH_FLAGS)
    except OSError as e:
        raise Refused(e.errno or errno.EIO, -1) from None
    for i, name in enumerate(parts):
        try:
            try:
                below = libc.openat2(fd, name, PATH_FLAGS)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)  # (never follows a link: one there is EEXIST)
                except FileExistsError:
                    pass  # made meanwhile, or a link: the open says which
                below = libc.openat2(fd, name, PATH_FLAGS)
        except OSError as e:
            os.close(fd)
            raise Refused(e.errno or errno.EIO, i) from None
        os.close(fd)
        fd = below
    return fd


def write(r: FileRequest) -> dict[str, Any]:
    last = len(r.parts) - 1
    parent = walk(r.parts[:-1], create=r.parents)
    name = r.parts[-1]
    try:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise Refused(e.errno or errno.EIO, last) from None
        else:
            if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                raise Refused(errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EISDIR, last)
        temp = f".sandboxd-{os.urandom(6).hex()}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
        except OSError as e:
            raise Refused(e.errno or errno.EIO, last) from None
        try:
            try:
                _copy_in(fd, r.size)
                os.fchmod(fd, r.mode)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException as e:
            try:
                os.unlink(temp, dir_fd=parent)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise Refused(e.errno or errno.EIO, last) from None
            raise
    finally:
        os.close(parent)
    return {"ok": True, "size": r.size, "mode": r.mode}


def _copy_in(fd: int, size: int) -> None:
    """Exactly ``size`` bytes of the daemon's memfd into ``fd``, copied by the kernel."""
    done = 0
    while done < size:
        n = os.sendfile(fd, FD_DATA, done, min(CHUNK, size - done))
        if not n:
            raise OSError(errno.EPIPE, "the content ended early")
        done += n


def read(r: FileRequest) -> dict[str, Any]:
    last = len(r.parts) - 1
    parent = walk(r.parts[:-1])
    try:
        fd = libc.openat2(parent, r.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a device): not opened, but what is it
            with contextlib.suppress(OSError):
                mode = os.stat(r.parts[-1], dir_fd=parent, follow_symlinks=False).st_mode
                raise Refused(errno.EINVAL, last, kind=kind(mode)) from None
        raise Refused(e.errno or errno.EIO, last) from None
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, last, kind=kind(st.st_mode))
        if st.st_size > r.max_bytes:
            raise Refused(errno.EFBIG, last, size=st.st_size)
        socket.send_fds(socket.socket(fileno=FD_SOCK), [b"f"], [fd])
    except OSError as e:
        raise Refused(e.errno or errno.EIO, last) from None
    finally:
        os.close(fd)
    return {"ok": True, "fd": True, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}


def listing(r: FileRequest) -> dict[str, Any]:
    where = walk(r.parts)
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
    except OSError as e:
        raise Refused(e.errno or errno.EIO, len(r.parts) - 1) from None
    finally:
        os.close(where)
    entries: list[dict[str, Any]] = []
    truncated = [False]
    try:
        _list(fd, "/".join(r.parts), r, 0, entries, truncated, [MAX_LISTING])
    finally:
        os.close(fd)
    return {"ok": True, "entries": entries, "truncated": truncated[0]}


def _list(fd: int, prefix: str, r: FileRequest, depth: int, entries: list[dict[str, Any]],
          truncated: list[bool], budget: list[int]) -> None:
    try:
        with os.scandir(fd) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError:
        truncated[0] = True
        return
    for entry in found:
        path = f"{prefix}/{entry.name}" if prefix else entry.name
        budget[0] -= len(path) + 64
        if len(entries) >= r.max_entries or budget[0] < 0:
            truncated[0] = True
            return
        try:
            path.encode("utf-8")  # a name that is not UTF-8 cannot be said (or asked for) over msgpack
            st = entry.stat(follow_symlinks=False)
        except (OSError, UnicodeError):
            truncated[0] = True
            continue
        entries.append({"path": path, "type": kind(st.st_mode), "size": st.st_size,
                        "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime})
        if r.recursive and stat.S_ISDIR(st.st_mode):
            if depth + 1 >= MAX_DEPTH:
                truncated[0] = True
                continue
            try:
                sub = libc.openat2(fd, entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                truncated[0] = True
                continue
            try:
                _list(sub, path, r, depth + 1, entries, truncated, budget)
            finally:
                os.close(sub)


ACTIONS = {"write": write, "read": read, "list": listing}
