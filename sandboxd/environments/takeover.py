"""Taking a finished build's directory over, as root, trusting nothing of what the build left:
what may stay in it, who owns it, and what it holds (the distributions' metadata)."""

from __future__ import annotations

import errno
import os
import stat

TAKEOVER_VERSION = 2  # 2: modes normalised, owner-set attributes removed (1 kept the build's modes)
DIR_MODE, FILE_MODE, EXEC_MODE = 0o755, 0o644, 0o755
# What a file's owner may set without privilege (security.capability needs CAP_SETFCAP, and
# chown clears it; security labels are the host's LSM's and stay).
OWNER_XATTRS = ("user.", "system.posix_acl_")


def make_own(top: str) -> list[str]:
    """As root, trusting nothing of what the build left: links that lead out of ``top`` and
    everything but files, directories and links go; the rest (``top`` too) becomes root's,
    with normalised modes -- directories 0755, files 0644, or 0755 when any execute bit was
    set: no group or other write, no set-id or sticky bits -- and none of the extended
    attributes an unprivileged owner can set (an ACL grants what the mode does not; a
    default ACL on a directory would reach the files the daemon writes there later).  The
    build is over (its pid namespace is gone) and the tree lies in a directory only root
    can enter, so nothing changes it under this walk.  Returns what was removed (relative
    paths)."""
    removed = []
    real_top = os.path.realpath(top)
    for dirpath, dirnames, filenames, dirfd in os.fwalk(top, follow_symlinks=False):
        gone = []
        for name in [*dirnames, *filenames]:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(os.path.join(dirpath, name))
                if target == real_top or target.startswith(real_top + "/"):
                    os.chown(name, 0, 0, dir_fd=dirfd, follow_symlinks=False)
                    continue
            elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                _normalise_at(dirfd, name, st)
                continue
            os.unlink(name, dir_fd=dirfd)
            removed.append(os.path.relpath(os.path.join(dirpath, name), top))
            gone.append(name)
        dirnames[:] = [n for n in dirnames if n not in gone]
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _normalise(fd, os.fstat(fd))
    finally:
        os.close(fd)
    return removed


def _normalise_at(dirfd: int, name: str, seen: os.stat_result) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
            raise OSError(f"{name} changed while the build was being taken over")
        _normalise(fd, st)
    finally:
        os.close(fd)


def _normalise(fd: int, st: os.stat_result) -> None:
    """Root's, its mode normalised, no extended attributes (``fd``: a file or directory)."""
    try:
        attrs = os.listxattr(fd)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        attrs = []  # a filesystem without extended attributes
    for attr in attrs:
        if attr.startswith(OWNER_XATTRS):
            os.removexattr(fd, attr)
    os.fchown(fd, 0, 0)
    mode = DIR_MODE if stat.S_ISDIR(st.st_mode) else EXEC_MODE if st.st_mode & 0o111 else FILE_MODE
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)


def installed(site: str) -> list[dict[str, str]]:
    """Distributions in ``site`` (name and version from each .dist-info's METADATA)."""
    out: list[dict[str, str]] = []
    try:
        entries = sorted(os.listdir(site))
    except OSError:
        return out
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        name = version = ""
        try:
            fd = os.open(os.path.join(site, entry, "METADATA"), os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
                for line in f.read(65536).splitlines():
                    if line.startswith("Name: "):
                        name = line[6:].strip()
                    elif line.startswith("Version: "):
                        version = line[9:].strip()
                    elif not line:
                        break
        except OSError:
            continue
        if name:
            out.append({"name": name[:200], "version": version[:100]})
    return out


def tree_size(top: str) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
