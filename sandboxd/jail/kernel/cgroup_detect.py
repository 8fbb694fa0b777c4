"""Which cgroup driver this host gets, and preparing the daemon's parent for it.

``detect`` prefers a delegated cgroup v2 subtree, then the v1 hierarchies, then none
(rlimits only); an explicit choice that does not work is an error with the reason.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from . import libc
from .cgroups import (
    V1_CONTROLLERS,
    V2_CONTROLLERS,
    CgroupDriver,
    CgroupError,
    CgroupInUse,
    read_control,
    write_control,
)

log = logging.getLogger(__name__)


def _mounts() -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point, {v1 controller: mount point})."""
    v2: str | None = None
    v1: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3 or len(fields) < 5:
                continue
            fstype, options = rfields[0], rfields[2].split(",")
            point = fields[4]
            if fstype == "cgroup2" and v2 is None:
                v2 = point
            elif fstype == "cgroup":
                for c in V1_CONTROLLERS:
                    if c in options:
                        v1.setdefault(c, point)
    return v2, v1


def _own_paths() -> tuple[str | None, dict[str, str]]:
    v2: str | None = None
    v1: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            hier, controllers, path = line.rstrip("\n").split(":", 2)
            if hier == "0" and controllers == "":
                v2 = path
            for c in controllers.split(","):
                v1[c] = path
    return v2, v1


def detect(parent: str, prefer: str = "auto") -> CgroupDriver:
    """Pick the driver for this host and prepare ``parent`` under the daemon's cgroup.

    ``prefer`` is ``auto``, ``cgroup2``, ``cgroup1`` or ``none``.  An explicit choice
    that does not work raises ``CgroupError`` with the reason; so does a parent that
    another live daemon holds (``CgroupInUse``), whatever the choice.
    """
    if prefer == "none":
        return CgroupDriver("none", {})
    v2_mount, v1_mounts = _mounts()
    v2_own, v1_own = _own_paths()
    candidates: list[tuple[str, Callable[[], CgroupDriver]]] = []
    if v2_mount and v2_own is not None:
        candidates.append(("cgroup2", lambda: _setup_v2(v2_mount, v2_own, parent)))
    candidates.append(("cgroup1", lambda: _setup_v1(v1_mounts, v1_own, parent)))
    errors: list[str] = []
    for kind, setup in candidates:
        if prefer not in ("auto", kind):
            continue
        try:
            driver = setup()
            driver.lock()
            return driver
        except CgroupInUse:
            raise
        except (OSError, CgroupError) as e:
            errors.append(f"{kind}: {e}")
            if prefer == kind:
                raise CgroupError("; ".join(errors)) from e
    if prefer != "auto":
        raise CgroupError(f"{prefer} is not available on this host")
    log.warning("no writable cgroup hierarchy (%s); runs are confined by rlimits only", "; ".join(errors))
    return CgroupDriver("none", {})


def favor_dynamic_modifications() -> str:
    """Remount the cgroup2 hierarchy with ``favordynmods`` (Linux 6.0+).

    Joining a cgroup otherwise waits for an RCU grace period while holding the global
    cgroup mutex: 5 ms per worker here, and every cgroup mkdir/rmdir of the daemon
    queues behind it.  The option trades that for slightly dearer fork/exit host-wide.
    It is global (one lock serves v1 and v2); v1 mounts cannot take it, so a v1-only host
    needs the ``cgroup_favordynmods=true`` boot parameter.  Returns what was done.
    """
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3 or rfields[0] != "cgroup2":
                continue
            point, mount_opts, super_opts = fields[4], fields[5].split(","), rfields[2].split(",")
            if "favordynmods" in super_opts:
                return f"favordynmods already set on {point}"
            flags = libc.MS_REMOUNT
            for opt in mount_opts:
                flags |= libc.MOUNT_OPTION_FLAGS.get(opt, 0)
            # A cgroup2 remount resets every option it does not name: keep the current ones.
            data = ",".join([*(o for o in super_opts if o not in ("rw", "ro")), "favordynmods"])
            try:
                libc.mount(None, point, None, flags, data)
            except OSError as e:
                return f"could not set favordynmods on {point} ({e.strerror}); cgroup joins will be slow"
            return f"set favordynmods on {point} (cgroup joins no longer wait for RCU)"
    return ("no cgroup2 mount: boot with cgroup_favordynmods=true to make cgroup joins fast "
            "(Linux 6.7+), or accept about 5 ms per worker")


def _setup_v2(mount: str, own: str, parent: str) -> CgroupDriver:
    own_dir = os.path.join(mount, own.lstrip("/"))
    available = set(read_control(os.path.join(own_dir, "cgroup.controllers")).split())
    missing = [c for c in ("memory", "pids") if c not in available]
    if missing:
        raise CgroupError(f"{own_dir} does not offer the {'/'.join(missing)} controller(s) (not delegated?)")
    wanted = [c for c in V2_CONTROLLERS if c in available]
    enable = " ".join("+" + c for c in wanted)
    if own != "/":
        # No internal processes: move this process into a leaf before enabling controllers.
        leaf = os.path.join(own_dir, "daemon")
        os.makedirs(leaf, exist_ok=True)
        procs = read_control(os.path.join(own_dir, "cgroup.procs")).split()
        for pid in procs:
            try:
                write_control(os.path.join(leaf, "cgroup.procs"), pid)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise CgroupError(f"cannot move pid {pid} into {leaf}: {e}") from e
    write_control(os.path.join(own_dir, "cgroup.subtree_control"), enable)
    base = os.path.join(own_dir, parent)
    os.makedirs(base, exist_ok=True)
    write_control(os.path.join(base, "cgroup.subtree_control"), enable)
    return CgroupDriver("cgroup2", {"v2": base}, enable)


def _setup_v1(mounts: dict[str, str], own: dict[str, str], parent: str) -> CgroupDriver:
    missing = [c for c in ("memory", "pids") if c not in mounts]
    if missing:
        raise CgroupError(f"controller(s) {', '.join(missing)} not mounted")
    bases: dict[str, str] = {}
    for c in V1_CONTROLLERS:
        if c not in mounts:
            continue
        base = os.path.join(mounts[c], own.get(c, "/").lstrip("/"), parent)
        os.makedirs(base, exist_ok=True)
        if not os.access(base, os.W_OK):
            raise CgroupError(f"{base} is not writable")
        bases[c] = base
    return CgroupDriver("cgroup1", bases)
