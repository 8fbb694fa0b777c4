"""Mount namespaces: one template with the root, and a private scratch per worker.

The template is built once per root by a short-lived helper: new mount namespace,
everything private, the root bind-mounted onto itself read-only/nosuid/nodev, the
five harmless device nodes bound in, ``pivot_root`` into it and the old root
detached.  The helper exits; the fork server keeps the namespace alive through an
fd.  Each worker then ``setns``-es into the template and ``unshare``-s a private copy
that holds nothing of the host: there is no old root left to reach.

Each worker also gets its own ``/dev``: a small read-only tmpfs with fresh nodes for the
five devices, so that no inode a run can open for writing is shared with another run or
the host (a lock on a shared /dev/null would be a channel between runs).

Scratch is one tmpfs (size and inode caps) mounted at ``/.scratch``; its
subdirectories are bound to ``/work`` (the working directory), ``/tmp``, ``/var/tmp``
and ``/dev/shm``, and the tmpfs itself is detached, so all writable places share
the caps and vanish with the namespace.
"""

from __future__ import annotations

import os
import stat

from . import libc
from .layout import DEVICE_NODES, DEVICE_NUMBERS, MARKER

SCRATCH = "/.scratch"
SCRATCH_BINDS = (("work", "/work", 0o755), ("tmp", "/tmp", 0o1777), ("shm", "/dev/shm", 0o1777))
EXTRA_BINDS = (("tmp", "/var/tmp"),)
RO_FLAGS = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
SCRATCH_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
DEV_FLAGS = libc.MS_NOSUID | libc.MS_NOEXEC


def enter_template(root: str) -> None:
    """In a fresh child: make the current process's mount namespace the template."""
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    libc.mount(root, root, None, libc.MS_BIND | libc.MS_REC)
    for node in DEVICE_NODES:
        target = os.path.join(root, "dev", node)
        libc.mount(f"/dev/{node}", target, None, libc.MS_BIND)
        flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NOEXEC
        libc.mount(None, target, None, flags)
    libc.mount(None, root, None, libc.MS_REMOUNT | libc.MS_BIND | RO_FLAGS)
    os.chdir(root)
    libc.pivot_root(".", ".old")
    libc.umount2("/.old", libc.MNT_DETACH)
    os.chdir("/")
    if not os.path.exists("/" + MARKER):
        raise OSError(2, f"{MARKER} not found after pivot_root into {root}")


def join_template(template_fd: int, unshare_flags: int) -> None:
    """Enter the template namespace and take a private copy of it (plus other namespaces)."""
    libc.setns(template_fd, libc.CLONE_NEWNS)
    libc.unshare(libc.CLONE_NEWNS | unshare_flags)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def mount_scratch(uid: int, gid: int, size: int, inodes: int) -> None:
    private_dev = _private_dev()
    opts = f"size={size},nr_inodes={inodes},mode=0755,uid=0,gid=0"
    libc.mount("sandboxd-scratch", SCRATCH, "tmpfs", SCRATCH_FLAGS, opts)
    for sub, target, mode in SCRATCH_BINDS:
        path = os.path.join(SCRATCH, sub)
        os.mkdir(path, mode)
        os.chmod(path, mode)  # mkdir honours the umask
        os.chown(path, uid, gid)
        _bind(path, target)
    for sub, target in EXTRA_BINDS:
        _bind(os.path.join(SCRATCH, sub), target)
    libc.umount2(SCRATCH, libc.MNT_DETACH)
    if private_dev:
        libc.mount(None, "/dev", None, libc.MS_REMOUNT | DEV_FLAGS | libc.MS_RDONLY)


def _private_dev() -> bool:
    """A fresh /dev: this worker's own device nodes, and the mount point for /dev/shm.

    Where device nodes cannot be made (no CAP_MKNOD, e.g. a unit with PrivateDevices=yes)
    the template's /dev stays, with the host's nodes bound in: runs work, but share those
    inodes (the daemon's self-test reports it).
    """
    libc.mount("sandboxd-dev", "/dev", "tmpfs", DEV_FLAGS, "size=16k,nr_inodes=16,mode=0755,uid=0,gid=0")
    try:
        for node in DEVICE_NODES:
            path = "/dev/" + node
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(*DEVICE_NUMBERS[node]))
            os.chmod(path, 0o666)  # mknod honours the umask
    except PermissionError:
        libc.umount2("/dev", libc.MNT_DETACH)
        return False
    os.mkdir("/dev/shm", 0o755)
    return True


def _bind(source: str, target: str) -> None:
    # A bind mount inherits nosuid/nodev/noexec from the tmpfs it comes from (clone_mnt copies
    # the source mount's flags), so no remount is needed; tests check the flags from inside.
    libc.mount(source, target, None, libc.MS_BIND)


def check_root() -> None:
    """The process sees the jail's root and nothing of the host's."""
    if not os.path.exists("/" + MARKER):
        raise OSError(2, f"/{MARKER} missing: not inside the jail root")
    if os.listdir("/.old"):
        raise OSError(17, "/.old is not empty: the old root is still reachable")
