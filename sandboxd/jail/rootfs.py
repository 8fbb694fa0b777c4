"""Build the read-only root the jail runs in, from a list of host paths.

Each configured path appears at the same place inside.  Symlinks are kept as
symlinks: a link to a file brings the file; a link to a directory brings the
directory only if it is itself configured (so ``/usr/lib/ssl/private`` can never
pull in ``/etc/ssl/private``).  Symlinked parents (``/lib -> usr/lib`` on merged-usr
systems) are reproduced.  Every ELF file is followed through ``DT_NEEDED`` with the
loader's search rules (``ldpath``) and the libraries it needs are brought in.

Files are hard-linked when that is safe (same filesystem, owned by root, not
writable by group or others, no set-id bits) and copied otherwise, with the copy
owned by root, mode sanitised and set-id bits stripped.  The build goes into a fresh
directory and an atomic symlink swap makes it current.  A manifest of every source
(path, type, size, mtime, mode) lets an unchanged configuration reuse the root.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .elf import is_elf
from .layout import DEVICE_NODES, MARKER, SKELETON_DIRS, forbidden_prefix, under
from .ldpath import LibraryResolver

log = logging.getLogger(__name__)

MANIFEST = ".sandboxd-manifest.json"
MANIFEST_VERSION = 2


class RootError(Exception):
    """The root cannot be built; the message says which path and why."""


@dataclass(frozen=True)
class RootSpec:
    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    generated: Mapping[str, bytes] = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([MANIFEST_VERSION, list(self.paths), list(self.exclude)]).encode())
        for name in sorted(self.generated):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.generated[name]).digest())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        """The spec for the builder process (``main``); generated files as latin-1 text."""
        return json.dumps({"paths": list(self.paths), "exclude": list(self.exclude), "required": list(self.required),
                           "generated": {k: v.decode("latin-1") for k, v in self.generated.items()}})

    @classmethod
    def from_json(cls, text: str) -> RootSpec:
        raw = json.loads(text)
        return cls(tuple(raw["paths"]), tuple(raw["exclude"]),
                   {k: v.encode("latin-1") for k, v in raw["generated"].items()}, tuple(raw["required"]))


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


@dataclass
class RootInfo:
    path: str
    build_id: str
    reused: bool
    seconds: float
    files: int
    bytes: int
    linked: int = 0
    copied: int = 0
    libraries: int = 0
    missing_libraries: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "path": self.path,
            "build_id": self.build_id,
            "reused": self.reused,
            "seconds": round(self.seconds, 4),
            "files": self.files,
            "bytes": self.bytes,
            "linked": self.linked,
            "copied": self.copied,
            "libraries": self.libraries,
            "missing_libraries": self.missing_libraries,
            "warnings": self.warnings,
        }


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


# -- building ---------------------------------------------------------------------------


Progress = Callable[[str, dict[str, Any]], None]


def _quiet(stage: str, info: dict[str, Any]) -> None:
    pass


def ensure_root(spec: RootSpec, base: str, force: bool = False, progress: Progress = _quiet) -> RootInfo:
    """Return the current root for ``spec`` under ``base``, building it if needed."""
    t0 = time.monotonic()
    os.makedirs(base, mode=0o755, exist_ok=True)
    current = os.path.join(base, "current")
    progress("collecting", {"paths": len(spec.paths)})
    inventory = Inventory(spec).collect()
    progress("collected", {"entries": len(inventory.entries), "libraries": inventory.libraries,
                           "missing_libraries": len(inventory.missing_libraries)})
    fingerprint = inventory.fingerprint()
    if not force:
        manifest = read_manifest(current)
        if manifest and manifest.get("spec") == spec.digest() and manifest.get("sources") == fingerprint:
            problem = verify_root(os.path.realpath(current), manifest)
            if problem is None:
                stats = manifest.get("stats", {})
                return RootInfo(
                    path=os.path.realpath(current),
                    build_id=str(manifest["build_id"]),
                    reused=True,
                    seconds=time.monotonic() - t0,
                    files=int(stats.get("files", 0)),
                    bytes=int(stats.get("bytes", 0)),
                    linked=int(stats.get("linked", 0)),
                    copied=int(stats.get("copied", 0)),
                    libraries=inventory.libraries,
                    missing_libraries=inventory.missing_libraries,
                    warnings=inventory.warnings,
                )
            log.warning("root %s is damaged (%s); rebuilding", current, problem)
            progress("damaged", {"problem": problem})
    return _build(spec, base, inventory, fingerprint, t0, progress)


def _build(spec: RootSpec, base: str, inv: Inventory, fingerprint: dict[str, list[object]], t0: float,
           progress: Progress) -> RootInfo:
    build_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{os.urandom(3).hex()}"
    final = os.path.join(base, f"root-{build_id}")
    tmp = final + ".partial"
    os.mkdir(tmp, 0o755)
    base_dev = os.stat(tmp).st_dev
    linked = copied = nbytes = files = 0
    try:
        for d in SKELETON_DIRS:
            os.makedirs(os.path.join(tmp, d), mode=0o755, exist_ok=True)
        os.chmod(os.path.join(tmp, ".scratch"), 0o000)
        os.chmod(os.path.join(tmp, ".old"), 0o000)
        for node in DEVICE_NODES:
            _write_file(os.path.join(tmp, "dev", node), b"", 0o644)
        total = len(inv.entries)
        progress("building", {"done": 0, "total": total})
        for n, path in enumerate(sorted(inv.entries), 1):
            if n % 500 == 0:
                progress("building", {"done": n, "total": total})
            src = inv.entries[path]
            dest = tmp + path
            parent = os.path.dirname(dest)
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o755, exist_ok=True)
            if src.kind == "d":
                os.makedirs(dest, mode=0o755, exist_ok=True)
                os.chmod(dest, _safe_mode(src.mode | 0o755) & 0o755)
            elif src.kind == "l":
                if not os.path.lexists(dest):
                    os.symlink(src.link, dest)
            else:
                files += 1
                nbytes += src.size
                if _can_link(src, base_dev):
                    try:
                        os.link(path, dest, follow_symlinks=False)
                        linked += 1
                        continue
                    except OSError:
                        pass
                _copy(path, dest, src.mode)
                copied += 1
        for name, content in spec.generated.items():
            dest = tmp + "/" + name.lstrip("/")
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            if os.path.lexists(dest):
                os.unlink(dest)
            _write_file(dest, content, 0o644)
        _write_file(os.path.join(tmp, MARKER), build_id.encode() + b"\n", 0o644)
        stats = {"files": files, "bytes": nbytes, "linked": linked, "copied": copied}
        manifest = {
            "version": MANIFEST_VERSION,
            "build_id": build_id,
            "spec": spec.digest(),
            "created": time.time(),
            "stats": stats,
            "sources": fingerprint,
            "generated": sorted(spec.generated),
        }
        _write_file(os.path.join(tmp, MANIFEST), json.dumps(manifest).encode(), 0o644)
        progress("building", {"done": total, "total": total})
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link_tmp = os.path.join(base, f".current-{build_id}")
    os.symlink(os.path.basename(final), link_tmp)
    os.rename(link_tmp, os.path.join(base, "current"))
    return RootInfo(
        path=final,
        build_id=build_id,
        reused=False,
        seconds=time.monotonic() - t0,
        files=files,
        bytes=nbytes,
        linked=linked,
        copied=copied,
        libraries=inv.libraries,
        missing_libraries=inv.missing_libraries,
        warnings=inv.warnings,
    )


def _can_link(src: Source, base_dev: int) -> bool:
    return src.dev == base_dev and src.uid == 0 and not src.mode & 0o022 and not src.mode & 0o6000


def _safe_mode(mode: int) -> int:
    return mode & 0o755 & ~0o6000


def _copy(src: str, dest: str, mode: int) -> None:
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset < size:  # sendfile works across filesystems (copy_file_range may not)
                n = os.sendfile(out, fd, offset, size - offset)
                if n == 0:
                    break
                offset += n
            os.fchown(out, 0, 0)
            os.fchmod(out, _safe_mode(mode) | 0o444)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _write_file(path: str, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, content)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def read_manifest(root: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION else None


def verify_root(root: str, manifest: Mapping[str, Any]) -> str | None:
    """Cheap damage check: every file and link in the manifest is present with its size."""
    sources = manifest.get("sources")
    if not isinstance(sources, dict):
        return "manifest has no sources"
    for path, key in sources.items():
        kind, size = key[0], key[2]
        try:
            st = os.lstat(root + path)
        except FileNotFoundError:
            return f"{path} is missing"
        if kind == "f" and (not stat.S_ISREG(st.st_mode) or st.st_size != size):
            return f"{path} changed"
    for name in manifest.get("generated", []) or []:
        if not os.path.exists(root + "/" + str(name).lstrip("/")):
            return f"{name} is missing"
    return None


def remove_stale_roots(base: str, keep: Iterable[str]) -> list[str]:
    """Delete roots under ``base`` other than those in ``keep`` (paths). Returns what was removed."""
    keep_names = {os.path.basename(os.path.realpath(k)) for k in keep}
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return removed
    for name in names:
        full = os.path.join(base, name)
        if name.startswith("root-") and name not in keep_names:
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
        elif name.startswith(".current-"):
            os.unlink(full)
    return removed


def remove_root(base: str, path: str) -> None:
    """Delete one root directory under ``base`` (nothing outside it, never ``current``)."""
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("root-") and os.path.dirname(os.path.realpath(path)) == os.path.realpath(base):
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m sandboxd.jail.rootfs SPEC.json BASE [--force]``: build in a separate
    process (the daemon's event loop keeps serving), one JSON line per progress step, the
    last one ``{"stage": "done", "root": {...}}`` or ``{"stage": "error", ...}``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("base")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    with open(args.spec, encoding="utf-8") as f:
        spec = RootSpec.from_json(f.read())

    def emit(stage: str, info: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({"stage": stage, **info}) + "\n")
        sys.stdout.flush()

    try:
        info = ensure_root(spec, args.base, force=args.force, progress=emit)
    except (RootError, OSError) as e:
        emit("error", {"message": str(e)})
        return 1
    emit("done", {"root": info.summary()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
