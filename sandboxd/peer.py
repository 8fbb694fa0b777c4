"""Who is calling: SO_PEERCRED at accept, group membership read per request.

Credentials are taken once, from the kernel, when the connection is accepted; a
socket without them is refused.  Names and groups are looked up from the user and
group databases on every request, so a user added to a group is recognised without
a restart (``getgrouplist`` reads the database each time).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


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
    try:
        pw = pwd.getpwuid(cred.uid)
        name = pw.pw_name
        gids = tuple(sorted(set(os.getgrouplist(name, pw.pw_gid)) | {cred.gid}))
    except KeyError:
        name, gids = str(cred.uid), (cred.gid,)
    names = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass
    return Identity(cred.uid, cred.gid, cred.pid, name, gids, tuple(names))
