"""What a root will hold: the configured host paths, walked, and the libraries they need.

``RootSpec`` is the input (paths, excludes, generated files); ``Inventory.collect``
walks each path, keeps symlinks as symlinks (a link to a file brings the file; a link
to a directory brings it only if it is itself configured, so ``/usr/lib/ssl/private``
can never pull in ``/etc/ssl/private``), reproduces symlinked parents, refuses the
forbidden places, and follows every ELF file through ``DT_NEEDED`` with the loader's
search rules (``ldpath``).  Its fingerprint (type, mode, size, mtime of every entry)
is what a root's manifest compares to reuse a build.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..spec.sections import forbidden_prefix, under
from .elf import is_elf
from .ldpath import LibraryResolver

MANIFEST_VERSION = 4  # of the builder's output: a new version rebuilds every root (4: copies keep mtimes)


class RootError(Exception):
    """The root cannot be built; the message says which path and why."""


@dataclass(frozen=True)
class RootSpec:
    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    generated: Mapping[str, bytes] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    hard_links: bool = False  # link the host's files in rather than copy them (root.hard_links)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([MANIFEST_VERSION, list(self.paths), list(self.exclude), self.hard_links]).encode())
        for name in sorted(self.generated):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.generated[name]).digest())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        """The spec for the builder process (``main``); generated files as latin-1 text."""
        return json.dumps({"paths": list(self.paths), "exclude": list(self.exclude), "required": list(self.required),
                           "generated": {k: v.decode("latin-1") for k, v in self.generated.items()},
                           "hard_links": self.hard_links})

    @classmethod
    def from_json(cls, text: str) -> RootSpec:
        raw = json.loads(text)
        return cls(tuple(raw["paths"]), tuple(raw["exclude"]),
                   {k: v.encode("latin-1") for k, v in raw["generated"].items()}, tuple(raw["required"]),
                   bool(raw.get("hard_links")))


@dataclass
class Source:
    kind: str  # "f" file, "d" directory, "l" symlink
    mode: int
    size: int = 0
    mtime_ns: int = 0
    uid: int = 0
    dev: int = 0
    link: str = ""

    def key(self) -> list[object]:
        return [self.kind, self.mode, self.size, self.mtime_ns, self.link]


class Inventory:
    """Everything the root will contain, keyed by absolute path inside (= on the host)."""

    def __init__(self, spec: RootSpec) -> None:
        self.spec = spec
        self.entries: dict[str, Source] = {}
        self.warnings: list[str] = []
        self.missing_libraries: dict[str, list[str]] = {}
        self.libraries = 0

    # -- collecting -------------------------------------------------------------------
    def collect(self, resolver: LibraryResolver | None = None) -> Inventory:
        for path in self.spec.paths:
            if not os.path.lexists(path):
                if path in self.spec.required:
                    raise RootError(f"{path}: required path does not exist on this host")
                self.warnings.append(f"{path}: configured path does not exist, skipped")
                continue
            self.add(path, recursive=True)
            if path in self.spec.required and os.path.realpath(path) not in self.entries:
                why = next((w for w in reversed(self.warnings) if w.startswith(os.path.realpath(path))), "")
                raise RootError(f"{path}: required, and it cannot go into the root: "
                                f"{why or 'excluded by root.exclude'}")
        self._add_libraries(resolver or LibraryResolver())
        return self

    def excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.spec.exclude)

    def add(self, path: str, recursive: bool, _depth: int = 0) -> None:
        """Add ``path`` with its symlinked parents, following links to files."""
        if _depth > 40:
            self.warnings.append(f"{path}: too many levels of symbolic links, skipped")
            return
        real = self._add_parents(os.path.normpath(path))
        if real is None or self.excluded(real):
            return
        if prefix := forbidden_prefix(real):
            self.warnings.append(f"{real}: refusing to bring a path under {prefix} into the root")
            return
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            self.warnings.append(f"{real}: vanished while building, skipped")
            return
        if stat.S_ISLNK(st.st_mode):
            self._add_link(real, st, recursive, _depth)
        elif stat.S_ISDIR(st.st_mode):
            self._record(real, st)
            if recursive:
                self._walk(real, _depth)
        elif stat.S_ISREG(st.st_mode):
            self._record(real, st)
        else:
            self.warnings.append(f"{real}: not a regular file, directory or symlink, skipped")

    def _add_parents(self, path: str) -> str | None:
        """Record symlinked parent directories; return the path with parents resolved."""
        parts = path.strip("/").split("/")
        current = "/"
        for i, part in enumerate(parts[:-1]):
            candidate = os.path.join(current, part)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(candidate)
                self.entries.setdefault(candidate, Source("l", 0o777, link=target))
                resolved = os.path.normpath(os.path.join(current, target))
                rest = "/".join(parts[i + 1 :])
                return self._add_parents(os.path.join(resolved, rest))
            current = candidate
        return path

    def _add_link(self, path: str, st: os.stat_result, recursive: bool, depth: int) -> None:
        target = os.readlink(path)
        self.entries[path] = Source("l", 0o777, mtime_ns=st.st_mtime_ns, link=target)
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        try:
            tst = os.stat(path)
        except OSError:
            return  # dangling on the host too: keep the link as it is
        if stat.S_ISDIR(tst.st_mode):
            configured = any(under(resolved, p) for p in self.spec.paths)
            # A directory others may not enter (/etc/ssl/private) is one no run could read:
            # leaving it out is the point, not something to warn about.
            private = tst.st_mode & 0o005 != 0o005
            if not configured and not private and not self._under_collected(resolved):
                self.warnings.append(
                    f"{path} -> {target}: directory outside the configured paths, link kept dangling"
                    f" (add {resolved} to root.paths if the jail needs it)"
                )
            return
        self.add(resolved, recursive=False, _depth=depth + 1)

    def _under_collected(self, path: str) -> bool:
        return path in self.entries and self.entries[path].kind == "d"

    def _walk(self, top: str, depth: int) -> None:
        for dirpath, dirnames, filenames in os.walk(top):
            keep = []
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if self.excluded(full):
                    continue
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self._add_link(full, st, True, depth)
                else:
                    self._record(full, st)
                    keep.append(d)
            dirnames[:] = keep
            for name in filenames:
                full = os.path.join(dirpath, name)
                if self.excluded(full):
                    continue
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self._add_link(full, st, False, depth)
                elif stat.S_ISREG(st.st_mode):
                    self._record(full, st)

    def _record(self, path: str, st: os.stat_result) -> None:
        kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
        size = st.st_size if kind == "f" else 0
        mtime = st.st_mtime_ns if kind == "f" else 0
        self.entries[path] = Source(kind, stat.S_IMODE(st.st_mode), size, mtime, st.st_uid, st.st_dev)

    def _add_libraries(self, resolver: LibraryResolver) -> None:
        elves = [p for p, s in self.entries.items() if s.kind == "f" and _maybe_elf(p, s)]
        found, missing = resolver.closure(elves)
        before = len(self.entries)
        for lib in sorted(found):
            self.add(lib, recursive=False)
        self.libraries = len(self.entries) - before
        self.missing_libraries = {k: v for k, v in sorted(missing.items())}
        for obj, names in self.missing_libraries.items():
            self.warnings.append(f"{obj}: needs {', '.join(names)}, not found on this host")

    # -- comparing --------------------------------------------------------------------
    def fingerprint(self) -> dict[str, list[object]]:
        return {p: s.key() for p, s in self.entries.items()}


def _maybe_elf(path: str, src: Source) -> bool:
    if src.size < 64:
        return False
    if not (src.mode & 0o111 or ".so" in os.path.basename(path)):
        return False
    return is_elf(path)
