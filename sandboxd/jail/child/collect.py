"""What a run leaves for its caller: files under /work/out, and figures in DISPLAY_DIR.

The supervisor reads them as the run's uid, inside the run's own mount namespace, so a
link or a racing rename can only lead to what the run could read itself; links are not
followed and only regular files are read (checked again on the open file).  For a run
that happens once everything of it is dead; for a session after each cell, while its
processes live, so only what is new or changed since the last cell comes back.
Whatever cannot be returned (unreadable, a name that is not UTF-8, too deep, over the
caps) is skipped and marks the result truncated; the rest still comes back.
"""

from __future__ import annotations

import os
import stat

from .contract import DISPLAY_DIR

OUT_DIR = "/work/out"
MAX_DEPTH = 8
MAX_DISPLAY = 16  # figures per run or cell

Seen = dict[str, tuple[int, int]]  # path under out/ -> (size, mtime_ns) when it was returned


def anything_to_collect() -> bool:
    """Whether the run left files to return: figures were saved, or out/ holds something.  An
    empty out/ — every run has one — or one the run removed or replaced by a non-directory
    (``out_files`` returns nothing then) is answered without waiting for the rest of the run
    to die first."""
    if os.path.lexists(DISPLAY_DIR):
        return True
    try:
        if not stat.S_ISDIR(os.lstat(OUT_DIR).st_mode):
            return False  # replaced by a file or a link: out_files returns nothing
        with os.scandir(OUT_DIR) as it:
            return next(it, None) is not None
    except FileNotFoundError:
        return False  # the run removed it
    except OSError:
        return True  # unreadable (chmod 000): collect says so, as files_truncated


def out_files(max_files: int, max_bytes: int, seen: Seen | None = None) -> tuple[dict[str, bytes], bool]:
    """Regular files under out/ (with ``seen``: only those new or changed since, and ``seen``
    is brought up to date)."""
    files: dict[str, bytes] = {}
    total = 0
    truncated = False
    try:
        if not stat.S_ISDIR(os.lstat(OUT_DIR).st_mode):
            return files, False
    except OSError:
        return files, False
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel_dir, depth = stack.pop()
        try:
            with os.scandir(os.path.join(OUT_DIR, rel_dir) if rel_dir else OUT_DIR) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            truncated = True
            continue
        for entry in entries:
            rel = rel_dir + entry.name
            try:
                rel.encode("utf-8")
                st = entry.stat(follow_symlinks=False)
            except (OSError, UnicodeError):
                truncated = True
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= MAX_DEPTH:
                    truncated = True
                else:
                    stack.append((rel + "/", depth + 1))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if seen is not None and seen.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            if len(files) >= max_files or total + st.st_size > max_bytes:
                truncated = True
                continue
            data = _read_regular(entry.path, max_bytes - total)
            if data is None:
                truncated = True
                continue
            files[rel] = data
            total += len(data)
            if seen is not None:
                seen[rel] = (st.st_size, st.st_mtime_ns)
    return files, truncated


def display(max_bytes: int, seen: set[str] | None = None) -> list[dict[str, object]]:
    """The figures the runtime saved (PNG files in DISPLAY_DIR, in order); with ``seen``
    (a session's), only those not returned before, and ``seen`` is brought up to date."""
    out: list[dict[str, object]] = []
    total = 0
    try:
        names = sorted(n for n in os.listdir(DISPLAY_DIR) if n.endswith(".png") and (seen is None or n not in seen))
    except OSError:
        return out
    for name in names[:MAX_DISPLAY]:
        data = _read_regular(os.path.join(DISPLAY_DIR, name), max_bytes - total)
        if seen is not None:
            seen.add(name)
        if data is not None:
            out.append({"mime": "image/png", "data": data})
            total += len(data)
    return out


def _read_regular(path: str, limit: int) -> bytes | None:
    """The file's bytes, if it is a regular file (on the open fd) of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks) if got <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)
