"""Files that two distributions of one environment both install, from their RECORDs.

pip installs a wheel's files over whatever is there without a word, so one requirement can
replace another's modules -- ``rtevil`` shipping ``rtgood/__init__.py`` puts its code into
every ``import rtgood``.  After a build every ``*.dist-info/RECORD`` is read: a path that two
distributions record with different contents (or without a hash to compare) refuses the
build.  Identical contents are allowed: pkgutil-style namespace packages ship the same
``__init__.py`` in every member.
"""

from __future__ import annotations

import csv
import os
import posixpath

MAX_RECORD = 16 << 20  # bytes of one RECORD read


def clashes(site: str) -> list[tuple[str, list[str]]]:
    """(path, distributions) for every path installed by more than one distribution with
    differing contents, sorted by path."""
    owners: dict[str, list[tuple[str, str]]] = {}
    try:
        entries = sorted(os.listdir(site))
    except OSError:
        return []
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        dist = entry[: -len(".dist-info")].rsplit("-", 1)[0]
        for path, digest in _record(os.path.join(site, entry, "RECORD")):
            if path.startswith(f"{entry}/"):
                continue
            owners.setdefault(path, []).append((dist, digest))
    out = []
    for path, seen in sorted(owners.items()):
        dists = sorted({d for d, _ in seen})
        if len(dists) > 1 and (len({h for _, h in seen}) > 1 or not all(h for _, h in seen)):
            out.append((path, dists))
    return out


def _record(path: str) -> list[tuple[str, str]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read(MAX_RECORD)
    rows = []
    for row in csv.reader(text.splitlines()):
        if row and row[0]:
            rows.append((posixpath.normpath(row[0]), row[1] if len(row) > 1 else ""))
    return rows


def describe(found: list[tuple[str, list[str]]], limit: int = 5) -> str:
    shown = "; ".join(f"{path} ({' and '.join(dists)})" for path, dists in found[:limit])
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return f"distributions overwrite each other's files: {shown}{more} -- remove one of them"
