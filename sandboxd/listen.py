"""The daemon's own listening socket, when systemd does not pass one in.

A stale socket file (no daemon behind it) is replaced; a live one, or anything that is
not a socket, is refused.  The file is made with a tight umask and then given the
configured group and mode; a group that does not exist leaves it to root alone.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat


class ListenError(Exception):
    pass


log = logging.getLogger("sandboxd")


def bind(path: str, mode: int, group: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise ListenError(f"another daemon is listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    gid = 0
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning("socket group %r does not exist: the socket is for root only (create the group and "
                        "reload, or set daemon.socket_group)", group)
            mode = 0o600
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    sock.listen(512)
    sock.setblocking(False)
    return sock
