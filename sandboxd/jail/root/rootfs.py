"""Build the read-only root the jail runs in, from a list of host paths.

Each configured path appears at the same place inside, with the libraries its ELF
files need (what goes in is the ``inventory``'s job).

Files are copied, the copy owned by root, mode sanitised and set-id bits stripped: a
root of copies shares no inode with the host, so a run's lock on a root file never
meets a host process's lock and its page cache is not the host's (``root.hard_links``
links them instead where that is safe -- same filesystem, owned by root, not writable
by group or others, no set-id bits -- building faster, in no space, but sharing
those).  The build goes into a fresh
directory and an atomic symlink swap makes it current.  A manifest of every source
(path, type, size, mtime, mode), kept next to the root rather than in it (runs must not
read the host's paths), lets an unchanged configuration reuse the root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .inventory import MANIFEST_VERSION, Inventory, RootError, RootSpec, Source
from .layout import DEVICE_NODES, SKELETON_DIRS

__all__ = ["MANIFEST_VERSION", "Inventory", "RootError", "RootInfo", "RootSpec", "ensure_root"]

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"  # next to the root, not in it: runs must not read host paths


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
                return _info(os.path.realpath(current), str(manifest["build_id"]), True, t0,
                             manifest.get("stats", {}), inventory)
            log.warning("root %s is damaged (%s); rebuilding", current, problem)
            progress("damaged", {"problem": problem})
    return _build(spec, base, inventory, fingerprint, t0, progress)


def _build(spec: RootSpec, base: str, inv: Inventory, fingerprint: dict[str, list[object]], t0: float,
           progress: Progress) -> RootInfo:
    build_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(4).hex()}"
    final = os.path.join(base, f"root-{build_id}")
    tmp = final + ".partial"
    os.mkdir(tmp, 0o755)
    try:
        for d in SKELETON_DIRS:
            os.makedirs(os.path.join(tmp, d), mode=0o755, exist_ok=True)
        for node in DEVICE_NODES:
            _write_file(os.path.join(tmp, "dev", node), b"", 0o644)
        stats = _place(inv, tmp, progress, spec.hard_links)
        for name, content in spec.generated.items():
            dest = tmp + "/" + name.lstrip("/")
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            if os.path.lexists(dest):
                os.unlink(dest)
            _write_file(dest, content, 0o644)
        manifest = {
            "version": MANIFEST_VERSION,
            "build_id": build_id,
            "spec": spec.digest(),
            "created": time.time(),
            "stats": stats,
            "sources": fingerprint,
            "generated": sorted(spec.generated),
        }
        os.rename(tmp, final)
        _write_file(final + MANIFEST_SUFFIX + ".partial", json.dumps(manifest).encode(), 0o600)
        os.rename(final + MANIFEST_SUFFIX + ".partial", final + MANIFEST_SUFFIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    link_tmp = os.path.join(base, f".current-{build_id}")
    os.symlink(os.path.basename(final), link_tmp)
    os.rename(link_tmp, os.path.join(base, "current"))
    return _info(final, build_id, False, t0, stats, inv)


def _place(inv: Inventory, tmp: str, progress: Progress, hard_links: bool) -> dict[str, int]:
    """Every entry of the inventory into the root being built; what it took."""
    base_dev = os.stat(tmp).st_dev
    stats = {"files": 0, "bytes": 0, "linked": 0, "copied": 0}
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
            stats["files"] += 1
            stats["bytes"] += src.size
            stats["linked" if _link_or_copy(path, dest, src, base_dev if hard_links else -1) else "copied"] += 1
    progress("building", {"done": total, "total": total})
    return stats


def _link_or_copy(path: str, dest: str, src: Source, base_dev: int) -> bool:
    """Hard-link when that is safe, else copy; True when linked."""
    if _can_link(src, base_dev):
        try:
            os.link(path, dest, follow_symlinks=False)
            return True
        except OSError:
            pass
    _copy(path, dest, src.mode)
    return False


def _info(path: str, build_id: str, reused: bool, t0: float, stats: Mapping[str, Any], inv: Inventory) -> RootInfo:
    return RootInfo(path=path, build_id=build_id, reused=reused, seconds=time.monotonic() - t0,
                    files=int(stats.get("files", 0)), bytes=int(stats.get("bytes", 0)),
                    linked=int(stats.get("linked", 0)), copied=int(stats.get("copied", 0)),
                    libraries=inv.libraries, missing_libraries=inv.missing_libraries, warnings=inv.warnings)


def _can_link(src: Source, base_dev: int) -> bool:
    return src.dev == base_dev and src.uid == 0 and not src.mode & 0o022 and not src.mode & 0o6000


def _safe_mode(mode: int) -> int:
    return mode & 0o755 & ~0o6000


def _copy(src: str, dest: str, mode: int) -> None:
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            copy_data(fd, out, st.st_size)
            os.fchown(out, 0, 0)
            os.fchmod(out, _safe_mode(mode) | 0o444)
            # The source's mtime is what a .pyc beside it records: a copy with a new one makes
            # every cached module stale, compiled again from source by every run (the root is
            # read-only), which costs a pandas import a second and a half.
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(fd)


def copy_data(src: int, dest: int, size: int) -> None:
    """The first ``size`` bytes of ``src`` into the empty ``dest``, holes kept holes: only the
    ranges SEEK_DATA finds are written (with sendfile, which works across filesystems, where
    copy_file_range may not), and the file is extended to ``size`` at the end.  A sparse
    file of 1 GiB with nothing in it (a package's, say) costs no block in each root that
    copies it, as it costs none where it came from; written densely, each copy cost 1 GiB.
    A filesystem that does not know holes reports the whole file as data."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        os.lseek(dest, start, os.SEEK_SET)
        while start < end:
            n = os.sendfile(dest, src, start, end - start)
            if n == 0:  # the source shrank under us: what there was is copied
                break
            start += n
        offset = end
    os.ftruncate(dest, size)


def _write_file(path: str, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, content)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def read_manifest(root: str) -> dict[str, Any] | None:
    try:
        with open(os.path.realpath(root) + MANIFEST_SUFFIX, encoding="utf-8") as f:
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
        if name.startswith(".current-"):
            os.unlink(full)
            continue
        owner = name.removesuffix(MANIFEST_SUFFIX).removesuffix(".partial").removesuffix(MANIFEST_SUFFIX)
        if not name.startswith("root-") or owner in keep_names:
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
        else:
            os.unlink(full)
    return removed


def remove_root(base: str, path: str) -> None:
    """Delete one root directory under ``base`` (nothing outside it, never ``current``)."""
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("root-") and os.path.dirname(os.path.realpath(path)) == os.path.realpath(base):
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(base, name + MANIFEST_SUFFIX))


def main(argv: list[str] | None = None) -> int:
    """``python -m sandboxd.jail.root.rootfs SPEC.json BASE [--force]``: build in a separate
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

