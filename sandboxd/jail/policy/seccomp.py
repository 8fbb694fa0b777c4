"""Compile syscall profiles to BPF once, load them last, and answer user notifications.

Compilation uses libseccomp (Debian's ``python3-seccomp`` module ``seccomp``, or
``pyseccomp`` from PyPI) in the fork server: one BPF program per (profile, network)
pair, exported as bytes.  The child installs those bytes with the raw ``seccomp(2)``
call, so nothing is compiled after fork.

Default action is ``SECCOMP_RET_USER_NOTIF``: a refused call waits until the daemon
(``workers.denials``, holding the listener) records the syscall's name and answers
``EPERM`` (or, in discovery mode, lets it continue).  A foreign architecture (the 32-bit ABI) kills the process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from . import profiles


def _backend() -> ModuleType:
    try:
        import seccomp as backend  # Debian's python3-seccomp
    except ImportError:
        import pyseccomp as backend  # PyPI, same API
    module: ModuleType = backend
    return module


class ProfileError(ValueError):
    pass


CONDITIONAL = tuple(profiles.CONDITIONAL)  # argument-checked below, unless a profile allows one outright


def unfiltered(profile: Profile) -> list[str]:
    """Argument-checked calls this profile allows outright (worth a warning)."""
    return [name for name in CONDITIONAL if name in profile.allow]


@dataclass(frozen=True)
class Profile:
    """A syscall policy, by name: what is allowed and what fails silently with an errno."""

    name: str
    allow: tuple[str, ...] = profiles.PYTHON_ALLOW
    errno: Mapping[str, int] = field(default_factory=lambda: dict(profiles.PYTHON_ERRNO))
    ioctls: tuple[int, ...] = profiles.IOCTL_ALLOWED
    prctls: tuple[int, ...] = profiles.PRCTL_ALLOWED
    threads_only: bool = False  # clone only for threads: no new processes (nodejs)

    def extended(self, name: str, allow: Iterable[str] = (), deny: Iterable[str] = (),
                 errnos: Mapping[str, int] | None = None) -> Profile:
        denied = set(deny)
        merged = [s for s in dict.fromkeys([*self.allow, *allow]) if s not in denied]
        errs = dict(self.errno)
        errs.update(errnos or {})
        return Profile(name, tuple(merged), errs, self.ioctls, self.prctls, self.threads_only)

    def to_wire(self) -> dict[str, Any]:
        return {"allow": list(self.allow), "errno": dict(self.errno), "ioctls": list(self.ioctls),
                "prctls": list(self.prctls), "threads_only": self.threads_only}

    @classmethod
    def from_wire(cls, name: str, d: Mapping[str, Any]) -> Profile:
        return cls(name, tuple(d["allow"]), dict(d["errno"]), tuple(d["ioctls"]), tuple(d["prctls"]),
                   bool(d.get("threads_only")))


BUILTIN = {
    "python3": Profile("python3"),
    "nodejs": Profile("nodejs", profiles.NODE_ALLOW, dict(profiles.NODE_ERRNO), threads_only=True),
}


def unknown_syscalls(names: Iterable[str]) -> list[str]:
    """Names libseccomp does not know on any architecture it supports."""
    sc = _backend()
    return [name for name in names if not _resolvable(sc, name)]


def _resolvable(sc: ModuleType, name: str) -> bool:
    try:
        return int(sc.resolve_syscall(sc.Arch.NATIVE, name)) >= 0
    except (ValueError, RuntimeError, TypeError):
        return False


def _add(sc: ModuleType, f: Any, action: Any, name: str, *args: Any) -> None:
    if _resolvable(sc, name):
        f.add_rule(action, name, *args)


def _export(f: Any) -> bytes:
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb") as wf:
            f.export_bpf(wf)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
    bpf = b"".join(chunks)
    if not bpf or len(bpf) % 8:
        raise ProfileError(f"libseccomp produced an invalid program ({len(bpf)} bytes)")
    return bpf


def compile_profile(profile: Profile, network: bool) -> bytes:
    """BPF bytes for ``profile``; AF_UNIX sockets always, AF_INET/AF_INET6 with ``network``."""
    sc = _backend()
    f = sc.SyscallFilter(sc.NOTIFY)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    f.set_attr(sc.Attr.CTL_NNP, 0)  # the child sets no_new_privs itself, as a named step
    # These are allowed below only with argument checks -- unless the profile names one
    # explicitly, which allows it outright (the daemon warns, and its self-test refuses a
    # profile that lets sockets through without network).
    special = set(CONDITIONAL) - set(profile.allow)
    for name in dict.fromkeys([*profile.allow, *profiles.RUNTIME_REQUIRED]):
        if name in special or name in profile.errno:
            continue
        _add(sc, f, sc.ALLOW, name)
    for name, err in profile.errno.items():
        _add(sc, f, sc.ERRNO(err), name)
    # clone: threads (and, unless threads_only, fork) yes, new namespaces no.
    if profile.threads_only:
        mask = profiles.NAMESPACE_FLAGS | profiles.CLONE_THREAD
        _add(sc, f, sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, mask, profiles.CLONE_THREAD))
    else:
        _add(sc, f, sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, profiles.NAMESPACE_FLAGS, 0))
    for req in profile.ioctls:
        _add(sc, f, sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, req))
    for opt in profile.prctls:
        _add(sc, f, sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, opt))
    for cmd in profiles.FCNTL_ALLOWED:
        _add(sc, f, sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
    for advice in profiles.MADVISE_ALLOWED:
        _add(sc, f, sc.ALLOW, "madvise", sc.Arg(2, sc.EQ, advice))
    for advice in profiles.FADVISE_ALLOWED:
        _add(sc, f, sc.ALLOW, "fadvise64", sc.Arg(3, sc.EQ, advice))
    for name in ("preadv2", "pwritev2"):
        _add(sc, f, sc.ALLOW, name, sc.Arg(5, sc.MASKED_EQ, profiles.RWF_NOWAIT, 0))
    _add(sc, f, sc.ALLOW, "personality", sc.Arg(0, sc.EQ, 0xFFFFFFFF))
    _add(sc, f, sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, 1))  # AF_UNIX pairs reach nothing
    fifo = sc.Arg(2, sc.MASKED_EQ, 0o170000, 0o010000)
    _add(sc, f, sc.ALLOW, "mknodat", fifo)
    _add(sc, f, sc.ALLOW, "mknod", sc.Arg(1, sc.MASKED_EQ, 0o170000, 0o010000))
    for family in (*profiles.LOCAL_FAMILIES, *(profiles.NETWORK_FAMILIES if network else ())):
        _add(sc, f, sc.ALLOW, "socket", sc.Arg(0, sc.EQ, int(family)))
    return _export(f)


def syscall_names() -> dict[int, str]:
    """Native syscall number -> name, for reporting (the daemon's denial handler has no libseccomp calls)."""
    sc = _backend()
    out: dict[int, str] = {}
    for nr in range(1024):
        try:
            name = sc.resolve_syscall(sc.Arch.NATIVE, nr)
        except (ValueError, RuntimeError, TypeError):
            continue
        if name:
            out[nr] = name.decode() if isinstance(name, bytes) else str(name)
    return out


def native_audit_arch() -> int:
    sc = _backend()
    return int(sc.system_arch())


# -- user notifications (struct seccomp_notif / seccomp_notif_resp) ----------------------

_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, instruction_pointer, args[6]
_RESP = struct.Struct("=QqiI")  # id, val, error, flags
_IOC_RW = 3
NOTIF_RECV = (_IOC_RW << 30) | (_NOTIF.size << 16) | (ord("!") << 8) | 0
NOTIF_SEND = (_IOC_RW << 30) | (_RESP.size << 16) | (ord("!") << 8) | 1
FLAG_CONTINUE = 1


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


def receive(fd: int) -> Notification | None:
    """Read one pending notification; None when the target went away meanwhile."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(fd, NOTIF_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(nid, pid, nr, arch, tuple(args))


def respond(fd: int, notification_id: int, error: int = errno.EPERM, allow: bool = False) -> None:
    """Answer a notification: fail the call with ``error``, or let it run (``allow``)."""
    if allow:
        buf = bytearray(_RESP.pack(notification_id, 0, 0, FLAG_CONTINUE))
    else:
        buf = bytearray(_RESP.pack(notification_id, 0, -error, 0))
    try:
        fcntl.ioctl(fd, NOTIF_SEND, buf, True)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the caller was killed while we decided
            raise
