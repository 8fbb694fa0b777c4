"""Small things every long-running process of sandboxd does to itself."""

from __future__ import annotations

import fcntl
import os
import resource


def raise_nofile() -> None:
    """Connections and pipes are fds: use the whole hard limit (systemd sets it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def try_lock(path: str, create: bool = False) -> int | None:
    """An exclusive flock on ``path`` -- a directory, or with ``create`` a file made if missing
    -- held by the returned fd; None when another process holds it."""
    flags = os.O_CLOEXEC | (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
