"""Taking a finished build's directory over, as root, trusting nothing of what the build left:
what may stay in it, who owns it, and what it holds (the distributions' metadata)."""

from __future__ import annotations

import os
import stat


def make_own(top: str, build_uid: int) -> list[str]:
    """As root, trusting nothing of what the build left: links that lead out of ``top`` and
    everything but files, directories and links go; what the build uid owns becomes root's,
    set-id bits dropped.  Returns what was removed (relative paths)."""
    removed = []
    real_top = os.path.realpath(top)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if not (target == real_top or target.startswith(real_top + "/")):
                    os.unlink(path)
                    removed.append(os.path.relpath(path, top))
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                os.unlink(path)
                removed.append(os.path.relpath(path, top))
                continue
            if st.st_uid == build_uid:
                os.lchown(path, 0, 0)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    os.lchown(top, 0, 0)
    return removed


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
