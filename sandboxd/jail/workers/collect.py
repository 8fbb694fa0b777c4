"""What a run leaves for its caller: files under /work/out, and figures in DISPLAY_DIR.

The daemon reads them through its fd of the run's scratch filesystem (the top the run
never reaches), as root -- so every open is ``openat2`` beneath a directory fd with no
link of any kind followed and no other mount crossed, only regular files are read
(checked again on the open fd, opened non-blocking so a FIFO cannot hold the daemon),
and what the run's own uid could not read is left out as it was when the run itself
looked.  A link or a racing rename can only lead to the run's own files.  For a run that
happens once everything of it is dead; for a session after each cell, while its
processes live, so only what is new or changed since the last cell comes back.
Whatever cannot be returned (unreadable, a name that is not UTF-8, too deep, over the
caps) is skipped and marks the result truncated; the rest still comes back.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any

from ..child.contract import DISPLAY_FROM_TOP, OUT_DIR
from ..kernel import libc

MAX_DEPTH = 8
MAX_DISPLAY = 16  # figures per run or cell

Seen = dict[str, tuple[int, int]]  # path under out/ -> (size, mtime_ns) when it was returned


class Scratch:
    """The run's scratch filesystem as the daemon reads it, with the run's uid's rights."""

    def __init__(self, top: int, uid: int, gid: int) -> None:
        self.top, self.uid, self.gid = top, uid, gid

    def may_read(self, st: os.stat_result, directory: bool = False) -> bool:
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid == self.gid:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bool(bits & 4) and (not directory or bool(bits & 1))

    @contextlib.contextmanager
    def directory(self, path: str, at: int | None = None) -> Iterator[int | None]:
        """An fd of the directory ``path`` beneath ``at`` (the top), or None if it is not one."""
        try:
            fd = libc.openat2(self.top if at is None else at, path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def read_file(self, at: int, name: str, limit: int, as_run: bool = True) -> bytes | None:
        """The file's bytes, if it is a regular file (that the run may read: ``as_run``) of at
        most ``limit`` bytes."""
        try:
            fd = libc.openat2(at, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (as_run and not self.may_read(st)) or st.st_size > limit:
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

    def read_handoff(self, name: str, size: int) -> bytes:
        """The handoff page (zeros if it cannot be read: a setup phase)."""
        data = self.read_file(self.top, name, size, as_run=False)  # (the jail's own file, root's)
        return (data or b"").ljust(size, b"\0")

    def anything_to_collect(self) -> bool:
        """Whether the run left files to return: figures were saved, or out/ holds something.
        An empty out/ -- every run has one -- or one the run removed or replaced by a
        non-directory (``out_files`` returns nothing then) is answered without waiting for
        the rest of the run to die first."""
        with self.directory(DISPLAY_FROM_TOP) as display:
            if display is not None:
                return True
        with self.directory(OUT_DIR) as out:
            if out is None:
                return False
            st = os.fstat(out)
            if not self.may_read(st, directory=True):
                return True  # unreadable (chmod 000): collect says so, as files_truncated
            with os.scandir(out) as it:
                return next(it, None) is not None

    def out_files(self, max_files: int, max_bytes: int, seen: Seen | None = None) -> tuple[dict[str, bytes], bool]:
        """Regular files under out/ (with ``seen``: only those new or changed since, and ``seen``
        is brought up to date)."""
        files: dict[str, bytes] = {}
        truncated = [False]
        with self.directory(OUT_DIR) as out:
            if out is not None:
                self._walk(out, "", 0, files, truncated, max_files, max_bytes, seen)
        return files, truncated[0]

    def _walk(self, fd: int, rel_dir: str, depth: int, files: dict[str, bytes], truncated: list[bool],
              max_files: int, max_bytes: int, seen: Seen | None) -> None:
        if not self.may_read(os.fstat(fd), directory=True):
            truncated[0] = True
            return
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            truncated[0] = True
            return
        for entry in entries:
            rel = rel_dir + entry.name
            try:
                rel.encode("utf-8")
                st = entry.stat(follow_symlinks=False)
            except (OSError, UnicodeError):
                truncated[0] = True
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= MAX_DEPTH:
                    truncated[0] = True
                    continue
                with self.directory(entry.name, at=fd) as sub:
                    if sub is None:
                        truncated[0] = True
                    else:
                        self._walk(sub, rel + "/", depth + 1, files, truncated, max_files, max_bytes, seen)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if seen is not None and seen.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            total = sum(len(v) for v in files.values())
            if len(files) >= max_files or total + st.st_size > max_bytes:
                truncated[0] = True
                continue
            data = self.read_file(fd, entry.name, max_bytes - total)
            if data is None:
                truncated[0] = True
                continue
            files[rel] = data
            if seen is not None:
                seen[rel] = (st.st_size, st.st_mtime_ns)

    def display(self, max_bytes: int, seen: set[str] | None = None) -> tuple[list[dict[str, object]], bool]:
        """The figures the runtime saved (PNG files in DISPLAY_DIR, in order), and whether some
        were left out (past ``max_bytes`` or MAX_DISPLAY); with ``seen`` (a session's), only
        those not returned before, and ``seen`` is brought up to date."""
        out: list[dict[str, object]] = []
        total = 0
        truncated = False
        with self.directory(DISPLAY_FROM_TOP) as d:
            if d is None:
                return out, False
            try:
                names = sorted(n for n in os.listdir(d) if n.endswith(".png") and (seen is None or n not in seen))
            except OSError:
                return out, True
            truncated = len(names) > MAX_DISPLAY
            for name in names[:MAX_DISPLAY]:
                data = self.read_file(d, name, max_bytes - total)
                if seen is not None:
                    seen.add(name)
                if data is None:
                    truncated = True
                else:
                    out.append({"mime": "image/png", "data": data})
                    total += len(data)
        return out, truncated


def cap_files(files: dict[str, bytes], max_count: int, max_bytes: int) -> tuple[dict[str, bytes], bool]:
    """Files by name, as many as fit both caps (and whether some were left out)."""
    out: dict[str, bytes] = {}
    total = 0
    truncated = False
    for name in sorted(files):
        data = files[name]
        if len(out) >= max_count or total + len(data) > max_bytes:
            truncated = True
            continue
        out[name] = data
        total += len(data)
    return out, truncated


def as_figures(raw: Any) -> list[dict[str, Any]]:
    """The figures of a report, as the protocol shows them: [{"mime": "image/png", "data": bin}]."""
    if not isinstance(raw, list):
        return []
    return [{"mime": "image/png", "data": f["data"]} for f in raw
            if isinstance(f, dict) and isinstance(f.get("data"), bytes)]
