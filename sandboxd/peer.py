"""Who is calling: SO_PEERCRED at accept, group membership read per request.

Credentials are taken once, from the kernel, when the connection is accepted; a
socket without them is refused.  Names and groups come from the user and group
databases for every request, so a user added to a group is recognised without a
restart.  The lookup (about 100 us: getpwuid, getgrouplist, getgrgid per group) is
reused while /etc/passwd and /etc/group are unchanged and for at most a second, so a
change in the files counts at once and one in a network directory within a second.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass

_UCRED = struct.Struct("3i")
DATABASES = ("/etc/passwd", "/etc/group")
CACHE_SECONDS = 1.0
_cache: dict[tuple[int, int], tuple[float, tuple[int, ...], tuple[str, tuple[int, ...], tuple[str, ...]]]] = {}


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    pid: int
    name: str
    gids: tuple[int, ...]
    groups: tuple[str, ...]

    def in_group(self, group: str) -> bool:
        if not group:
            return False
        if group.isdigit():
            return int(group) in self.gids
        return group in self.groups


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    """The connecting process's pid/uid/gid, or None when the kernel gives none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    if uid < 0 or gid < 0 or pid <= 0:
        return None
    return PeerCred(pid, uid, gid)


def identify(cred: PeerCred) -> Identity:
    now = time.monotonic()
    stamp = _stamp()
    hit = _cache.get((cred.uid, cred.gid))
    if hit is not None and hit[1] == stamp and now - hit[0] < CACHE_SECONDS:
        name, gids, names = hit[2]
        return Identity(cred.uid, cred.gid, cred.pid, name, gids, names)
    ident = _look_up(cred)
    if len(_cache) > 4096:
        _cache.clear()
    _cache[(cred.uid, cred.gid)] = (now, stamp, (ident.name, ident.gids, ident.groups))
    return ident


def _stamp() -> tuple[int, ...]:
    out: list[int] = []
    for path in DATABASES:
        try:
            st = os.stat(path)
            out += (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            out += (0, 0, 0)
    return tuple(out)


def _look_up(cred: PeerCred) -> Identity:
    try:
        pw = pwd.getpwuid(cred.uid)
        name = pw.pw_name
        gids = tuple(sorted(set(os.getgrouplist(name, pw.pw_gid)) | {cred.gid}))
    except KeyError:
        name, gids = str(cred.uid), (cred.gid,)
    names: list[str] = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass
    return Identity(cred.uid, cred.gid, cred.pid, name, gids, tuple(names))
