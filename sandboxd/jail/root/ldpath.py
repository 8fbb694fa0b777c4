"""Find shared objects the way the dynamic loader does, for the host's architecture.

Order (ld.so(8)): a name with a slash is a path; otherwise ``DT_RPATH`` of the loading
object (only when it has no ``DT_RUNPATH``), then ``DT_RUNPATH``, then the directories
of ``/etc/ld.so.conf`` (what ``ld.so.cache`` is built from), then the trusted default
directories.  ``$ORIGIN``, ``$LIB`` and ``$PLATFORM`` are expanded.  A candidate whose
ELF class or machine differs from the loading object is skipped, as the loader does.
"""

from __future__ import annotations

import glob
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from functools import lru_cache

from .elf import ElfError, ElfInfo, read_elf


@lru_cache(maxsize=1)
def multiarch() -> str:
    """The Debian multiarch tuple of this interpreter, e.g. ``x86_64-linux-gnu``."""
    tuple_ = sysconfig.get_config_var("MULTIARCH")
    if tuple_:
        return str(tuple_)
    return f"{platform.machine()}-linux-gnu"


def default_dirs() -> list[str]:
    ma = multiarch()
    dirs = [f"/lib/{ma}", f"/usr/lib/{ma}", "/lib", "/usr/lib"]
    if platform.machine() in ("x86_64", "aarch64", "ppc64le", "s390x"):
        dirs += ["/lib64", "/usr/lib64"]
    return dirs


def ld_so_conf_dirs(conf: str = "/etc/ld.so.conf", _depth: int = 0) -> list[str]:
    """Directories named by ld.so.conf and the files it includes."""
    dirs: list[str] = []
    if _depth > 8:
        return dirs
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return dirs
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include"):
            pattern = line.split(None, 1)[1] if " " in line or "\t" in line else ""
            if pattern and not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(conf), pattern)
            for inc in sorted(glob.glob(pattern)):
                dirs.extend(ld_so_conf_dirs(inc, _depth + 1))
        elif line.startswith("hwcap"):
            continue
        else:
            dirs.append(line)
    return dirs


class LibraryResolver:
    """Resolves DT_NEEDED names to paths; caches parsed files.

    Paths in and out are as the loader would see them.  With a ``sysroot`` (a jail root)
    every file is looked for under it -- search directories, absolute DT_RUNPATHs, names
    with a slash, the ELF interpreter -- while paths keep their form inside the root.
    """

    def __init__(self, system_dirs: Iterable[str] | None = None, sysroot: str = "") -> None:
        if system_dirs is None:
            system_dirs = _dedup([*ld_so_conf_dirs(), *default_dirs()])
        self.system_dirs = list(system_dirs)
        self.sysroot = sysroot.rstrip("/")
        self._info: dict[str, ElfInfo | None] = {}

    def _isfile(self, path: str) -> bool:
        return os.path.isfile(self.sysroot + path)

    def info(self, path: str) -> ElfInfo | None:
        if path not in self._info:
            try:
                self._info[path] = read_elf(self.sysroot + path)
            except (OSError, ElfError, ValueError):
                self._info[path] = None
        return self._info[path]

    def search_dirs(self, path: str, info: ElfInfo) -> Iterator[str]:
        origin = os.path.dirname(os.path.abspath(path))
        if not info.runpath:
            yield from (_expand(d, origin) for d in info.rpath)
        yield from (_expand(d, origin) for d in info.runpath)
        yield from self.system_dirs

    def resolve(self, path: str, name: str) -> str | None:
        """Host path of the library ``name`` needed by the object at ``path``."""
        info = self.info(path)
        if info is None:
            return None
        if "/" in name:  # a path: only if it is an object the loader could load (never any file named)
            cand = self.info(name) if self._isfile(name) else None
            return name if cand is not None and cand.elf_class == info.elf_class else None
        for d in self.search_dirs(path, info):
            candidate = os.path.join(d, name)
            if not self._isfile(candidate):
                continue
            cand = self.info(candidate)
            if cand is not None and cand.elf_class == info.elf_class and cand.machine == info.machine:
                return candidate
        return None

    def closure(self, roots: Iterable[str]) -> tuple[set[str], dict[str, list[str]]]:
        """All libraries (and loaders) reachable from ``roots``; and what could not be found.

        Returns ``(found, missing)`` where ``missing`` maps an object to its unresolved names.
        """
        found: set[str] = set()
        missing: dict[str, list[str]] = {}
        todo = list(roots)
        seen: set[str] = set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            info = self.info(path)
            if info is None:
                continue
            if info.interpreter and self._isfile(info.interpreter) and self.info(info.interpreter) is not None:
                found.add(info.interpreter)
                todo.append(info.interpreter)
            for name in info.needed:
                lib = self.resolve(path, name)
                if lib is None:
                    missing.setdefault(path, []).append(name)
                    continue
                found.add(lib)
                todo.append(lib)
        return found, missing


def _expand(directory: str, origin: str) -> str:
    for token, value in (
        ("$ORIGIN", origin),
        ("${ORIGIN}", origin),
        ("$LIB", f"lib/{multiarch()}"),
        ("${LIB}", f"lib/{multiarch()}"),
        ("$PLATFORM", platform.machine()),
        ("${PLATFORM}", platform.machine()),
    ):
        directory = directory.replace(token, value)
    return os.path.normpath(directory)


def _dedup(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
