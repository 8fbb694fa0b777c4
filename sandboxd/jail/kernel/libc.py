"""The few Linux system calls Python 3.11's ``os`` module lacks, through ctypes.

Every wrapper raises ``OSError`` with the real errno and names the call and its
arguments, so a failing setup step can say exactly what went wrong.  Syscall
numbers are looked up per architecture; only the calls glibc does not wrap
(``pivot_root``, ``seccomp``) need them.
"""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)

# clone / unshare / setns flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_NODIRATIME = 0x800
MS_NOATIME = 0x400
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
# Per-mount options as /proc/self/mountinfo spells them, and their mount(2) flags.
MOUNT_OPTION_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
                      "strictatime": MS_STRICTATIME}
MNT_DETACH = 0x2

# prctl options
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# seccomp(2)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3

_SYSCALL_NUMBERS = {
    # name: (x86_64, aarch64)
    "pivot_root": (155, 41),
    "seccomp": (317, 277),
}
_ARCH_INDEX = {"x86_64": 0, "aarch64": 1}


def _nr(name: str) -> int:
    machine = platform.machine()
    try:
        return _SYSCALL_NUMBERS[name][_ARCH_INDEX[machine]]
    except KeyError:
        raise OSError(38, f"{name}: unsupported architecture {machine}") from None


def _check(rc: int, call: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")
    return rc


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({fd}, {nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(rc, f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount2({target!r}, {flags:#x})")


def pivot_root(new_root: str, put_old: str) -> None:
    rc = _libc.syscall(ctypes.c_long(_nr("pivot_root")), _b(new_root), _b(put_old))
    _check(rc, f"pivot_root({new_root!r}, {put_old!r})")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    rc = _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
    )
    return _check(rc, f"prctl({option}, {arg2}, {arg3})")


def set_name(name: str) -> None:
    """The process name shown by ps and top (15 bytes at most)."""
    _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def cap_last_cap() -> int:
    """The highest capability this kernel knows, probed with PR_CAPBSET_READ.

    Probing rather than reading /proc/sys/kernel/cap_last_cap keeps working where /proc
    shows only processes (systemd's ProcSubset=pid).
    """
    fn = _libc.prctl
    cap = 0
    while fn(PR_CAPBSET_READ, cap + 1, 0, 0, 0) >= 0:
        cap += 1
    return cap


def drop_bounding_set(cap_last: int) -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP, so before giving up root)."""
    fn = _libc.prctl
    for cap in range(cap_last + 1):
        if fn(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def capset_empty() -> None:
    """Clear the effective, permitted and inheritable capability sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset(all empty)")


def capget() -> tuple[int, int, int]:
    """Return (effective, permitted, inheritable) as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget()")
    eff = data[0].effective | data[1].effective << 32
    perm = data[0].permitted | data[1].permitted << 32
    inh = data[0].inheritable | data[1].inheritable << 32
    return eff, perm, inh


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_load(bpf: bytes, new_listener: bool) -> int:
    """Install a raw BPF program (8 bytes an instruction); return the listener fd or -1."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if new_listener else 0
    rc = _libc.syscall(
        ctypes.c_long(_nr("seccomp")), ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), ctypes.byref(prog)
    )
    return _check(rc, f"seccomp(SET_MODE_FILTER, flags={flags:#x}, {len(bpf) // 8} instructions)")


# openat2(2): resolve a path beneath a directory fd, never through a link or out of the mount
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_STRICTLY_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_SYSCALL_NUMBERS["openat2"] = (437, 437)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_STRICTLY_BENEATH) -> int:
    """``path`` opened beneath ``dir_fd`` (by default: no link of any kind followed, no
    ``..`` out of it, no other mount crossed), or OSError with the real errno."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    rc = _libc.syscall(ctypes.c_long(_nr("openat2")), ctypes.c_int(dir_fd), _b(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(rc, f"openat2({dir_fd}, {path!r}, {flags:#x}, resolve={resolve:#x})")
