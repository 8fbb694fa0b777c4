"""Become the run's throwaway uid with no capabilities left anywhere.

Order matters: the bounding set can only be emptied while CAP_SETPCAP is held, so it
goes first; then supplementary groups, gid, uid (which clears the permitted and
effective sets); then the inheritable and ambient sets.  The result is verified
rather than assumed.
"""

from __future__ import annotations

import os

from . import libc


def drop(uid: int, gid: int, cap_last: int) -> None:
    if uid == 0 or gid == 0:
        raise OSError(1, "refusing to run as uid or gid 0")
    libc.drop_bounding_set(cap_last)
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc.capset_empty()
    verify(uid, gid)


def verify(uid: int, gid: int) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError(1, f"credentials are {os.getresuid()}/{os.getresgid()}/{os.getgroups()}, expected {uid}/{gid}")
    eff, perm, inh = libc.capget()
    if eff or perm or inh:
        raise OSError(1, f"capabilities remain: eff={eff:#x} perm={perm:#x} inh={inh:#x}")
