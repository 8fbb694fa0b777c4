"""Mount namespaces: one template with the root, and a private scratch per worker.

The template is built once per root by a short-lived helper (``template``): new mount namespace,
everything private, the root bind-mounted onto itself read-only/nosuid/nodev, the
five harmless device nodes bound in, ``pivot_root(".", ".")`` into it and the old root
detached from on top.  The helper exits; the fork server keeps the namespace alive
through an fd.  Each worker then ``setns``-es into the template and ``unshare``-s a
private copy that holds nothing of the host: there is no old root left to reach, and
no mount point of the jail's own in what a run can list.

Each worker also gets its own ``/dev``: a small read-only tmpfs with fresh nodes for the
five devices, so that no inode a run can open for writing is shared with another run or
the host (a lock on a shared /dev/null would be a channel between runs).

Scratch is one tmpfs (size and inode caps) mounted at ``/work``; its subdirectories are
bound onto ``/tmp``, ``/var/tmp``, ``/dev/shm`` and, last, ``/work`` itself, which hides
the tmpfs's own top: all writable places share the caps and no mount point of the jail's
own is left to list.  The daemon holds an fd of the top (through it it reads ``out/`` and
the handoff page); the filesystem goes when that fd is closed after the run.
"""

from __future__ import annotations

import os
import stat

from . import libc

DEVICE_NODES = ("null", "zero", "full", "random", "urandom")  # in /dev, each run its own nodes
DEVICE_NUMBERS = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
# (directory in the scratch, mode, where it is bound); work/out is every run's out/ (collect.OUT_DIR)
SCRATCH_DIRS = (("tmp", 0o1777, ("/tmp", "/var/tmp")), ("shm", 0o1777, ("/dev/shm",)), ("work", 0o755, ("/work",)),
                ("work/out", 0o755, ()))
RO_FLAGS = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
SCRATCH_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
DEV_FLAGS = libc.MS_NOSUID | libc.MS_NOEXEC


def root_id(where: str | int) -> tuple[int, int]:
    """What identifies the root directory from inside as from outside: (st_dev, st_ino)."""
    st = os.stat(where)
    return st.st_dev, st.st_ino


def enter_template(root: str) -> None:
    """In a fresh process: make its mount namespace the template of ``root``."""
    expected = root_id(root)
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
    # The old root ends up stacked on top of the new one; detaching it leaves only the new.
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
    check_root(expected)


def join_template(template_fd: int, unshare_flags: int) -> None:
    """Enter the template namespace and take a private copy of it (plus other namespaces)."""
    libc.setns(template_fd, libc.CLONE_NEWNS)
    libc.unshare(libc.CLONE_NEWNS | unshare_flags)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def mount_scratch(uid: int, gid: int, size: int, inodes: int) -> int:
    """Mount the worker's scratch; return an fd of its top (which the binds then hide: only
    the fd reaches it, and it keeps the filesystem alive after the mount namespace is gone)."""
    private_dev = _private_dev()
    opts = f"size={size},nr_inodes={inodes},mode=0755,uid=0,gid=0"
    libc.mount("sandboxd-scratch", "/work", "tmpfs", SCRATCH_FLAGS, opts)
    top = os.open("/work", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for sub, mode, _targets in SCRATCH_DIRS:
        path = os.path.join("/work", sub)
        os.mkdir(path, mode)
        os.chmod(path, mode)  # mkdir honours the umask
        os.chown(path, uid, gid)
    for sub, _mode, targets in SCRATCH_DIRS:
        for target in targets:
            # A bind keeps the tmpfs mount's nosuid/nodev/noexec; tests check them from inside.
            # /work/work goes last, onto /work itself: the tmpfs's own top (holding the
            # subdirectories) is then under it, out of every path's reach.
            libc.mount(os.path.join("/work", sub), target, None, libc.MS_BIND)
    if private_dev:
        libc.mount(None, "/dev", None, libc.MS_REMOUNT | DEV_FLAGS | libc.MS_RDONLY)
    return top


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


def check_root(expected: tuple[int, int]) -> None:
    """The process's root is the jail's root (the template's, identified by device and inode)."""
    found = root_id("/")
    if found != expected:
        raise OSError(2, f"/ is {found}, expected the jail root {expected}: not inside the jail")
