"""Is the configured run-uid range free?  ``python3 -m sandboxd.uidcheck [CONFIG]``.

A run uid that some user, group or subordinate-id range (rootless containers) also uses
would let that user signal or ptrace runs, and runs touch that user's files.  Prints one
line per overlap; exit 0 when the range is free, 1 when it is not, 2 for a bad config.
"""

from __future__ import annotations

import grp
import pwd
import sys

from .config import DEFAULT_CONFIG, ConfigError, load


def overlaps(first: int, count: int) -> list[str]:
    last = first + count - 1
    found = [f"user {p.pw_name} has uid {p.pw_uid}" for p in pwd.getpwall() if first <= p.pw_uid <= last]
    found += [f"group {g.gr_name} has gid {g.gr_gid}" for g in grp.getgrall() if first <= g.gr_gid <= last]
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                lo, n = int(parts[1]), int(parts[2])
                if lo <= last and first <= lo + n - 1:
                    found.append(f"{path} gives {parts[0]} ids {lo}-{lo + n - 1}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else DEFAULT_CONFIG
    try:
        first, count = load(path).jail.run_uids
    except ConfigError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return 2
    problems = overlaps(first, count)
    for p in problems:
        print(f"sandboxd: jail.run_uids {first}-{first + count - 1} overlaps: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
