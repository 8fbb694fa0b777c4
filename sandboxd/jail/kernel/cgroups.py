"""Per-worker control groups: memory (swap off), pids and cpu, on cgroup v2 or v1.

cgroup v2 is used when the daemon owns a delegated subtree (``Delegate=yes``): the
daemon moves itself into a leaf (``<own>/daemon``), enables ``+memory +pids +cpu`` for
its children and creates one cgroup per worker under ``<own>/<parent>``.  Otherwise
the v1 ``memory``, ``pids``, ``cpu`` and ``cpuacct`` hierarchies are used with the same
layout under the daemon's own cgroup in each.  Where neither is writable the driver
is ``none`` and only rlimits confine a run; results say which one applied.  Which
driver a host gets is ``cgroup_detect``'s choice.

The worker joins its cgroups itself, first thing after fork, by writing ``0`` to each
``cgroup.procs`` listed in ``WorkerCgroup.procs_files``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass

from ...common.process import try_lock

log = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
SLOT_SCOPED = ("cpu", "cpuacct")  # v1 controllers whose cgroup belongs to the uid slot, not the worker
V2_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(Exception):
    pass


class CgroupInUse(CgroupError):
    """Another live daemon holds the same cgroup parent."""


@dataclass
class CgroupStats:
    memory_peak: int | None = None  # bytes
    oom_kills: int = 0
    memory_max_hits: int = 0
    pids_max_hits: int = 0
    cpu_usage_ns: int | None = None


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes
    pids: int
    cpu_quota: float  # CPUs (1.0 = one full core); 0 = unlimited
    active: bool = True  # False while pooled: minimal CPU weight, so making workers never slows a run

# CPU weight of a waiting worker and of a running one (v1 cpu.shares, v2 cpu.weight).
WEIGHTS = {"cgroup1": (2, 1024), "cgroup2": (1, 100)}


def read_control(path: str) -> str:
    """A control file's contents (raw fd calls: half the cost of open(), on the result's path)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii")
    finally:
        os.close(fd)


def write_control(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def keyed(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


class WorkerCgroup:
    """The cgroup(s) of one worker."""

    def __init__(self, driver: CgroupDriver, dirs: dict[str, str], kept: frozenset[str] = frozenset()) -> None:
        self.driver = driver
        self.dirs = dirs  # controller (or "v2") -> directory
        self.kept = kept  # directories that belong to the uid slot and outlive this worker
        self.written: dict[str, str] = {}  # control file -> value this object wrote

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values()))]

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self.dirs["v2" if "v2" in self.dirs else controller], name)

    def _set(self, controller: str, name: str, value: str) -> None:
        """Write a control file unless it already holds ``value`` (releasing a worker is on
        the run's clock: each cgroupfs write costs tens of microseconds)."""
        path = self._file(controller, name)
        if self.written.get(path) != value:
            write_control(path, value)
            self.written[path] = value

    def set_limits(self, limits: Limits) -> None:
        self.set_memory_and_pids(limits.memory, limits.pids)
        if self.driver.has_cpu:
            self._set_cpu(limits.cpu_quota, limits.active)

    def set_cpu(self, cpus: float, active: bool) -> None:
        """The CPU bandwidth (0: none) and weight of what runs in it now (a session between execs)."""
        if self.driver.has_cpu:
            try:
                self._set_cpu(cpus, active)
            except OSError as e:
                log.warning("setting the CPU of %s: %s", self.dirs, e)

    def set_memory_and_pids(self, memory: int, pids: int) -> None:
        if self.driver.kind == "cgroup2":
            self._set("memory", "memory.max", str(memory))
            self._set("pids", "pids.max", str(pids))
        elif self.driver.kind == "cgroup1":
            self._set_v1_memory(memory)
            self._set("pids", "pids.max", str(pids))

    def unthrottle(self) -> None:
        """Lift the CPU bandwidth limit of a run that is being killed.  Its tasks need CPU
        time to die: a fork bomb's 64 processes sharing one throttled CPU took over 10 s
        to exit under load (measured in make soak), holding the run's pipes and uid slot."""
        if self.driver.has_cpu:
            try:
                self._set_cpu(0, active=True)
            except OSError as e:
                log.warning("unthrottling %s: %s", self.dirs, e)

    def _set_v1_memory(self, limit: int) -> None:
        mem = self._file("memory", "memory.limit_in_bytes")
        current = self.written.get(mem)
        if current == str(limit):
            return
        has_memsw = self.driver.has_memsw
        # memory.limit_in_bytes may never exceed memsw: raise memsw first, lower memory first.
        if current is None:  # first write to this cgroup: ask the kernel (unlimited when fresh)
            current = read_control(mem).strip()
        raising = limit > int(current)
        if has_memsw and raising:
            self._set("memory", "memory.memsw.limit_in_bytes", str(limit))
        self._set("memory", "memory.limit_in_bytes", str(limit))
        if has_memsw and not raising:
            self._set("memory", "memory.memsw.limit_in_bytes", str(limit))

    def _set_cpu(self, cpus: float, active: bool) -> None:
        period = 100_000
        weight = str(WEIGHTS[self.driver.kind][1 if active else 0])
        quota = "-1" if cpus <= 0 else str(max(1000, int(cpus * period)))
        if self.driver.kind == "cgroup2":
            self._set("cpu", "cpu.max", "max" if cpus <= 0 else f"{quota} {period}")
            self._set("cpu", "cpu.weight", weight)
        else:
            self._set("cpu", "cpu.cfs_period_us", str(period))
            self._set("cpu", "cpu.cfs_quota_us", quota)
            self._set("cpu", "cpu.shares", weight)

    def cpu_usage_ns(self) -> int | None:
        try:
            if self.driver.kind == "cgroup2":
                return keyed(read_control(self._file("cpu", "cpu.stat")))["usage_usec"] * 1000
            if "cpuacct" in self.dirs:
                return int(read_control(self._file("cpuacct", "cpuacct.usage")))
        except (OSError, KeyError, ValueError):
            return None
        return None

    def usage(self) -> CgroupStats:
        """Only what a session's cell reports (CPU, memory peak): two files, not five."""
        st = CgroupStats(cpu_usage_ns=self.cpu_usage_ns())
        peak = ("memory", "memory.peak") if self.driver.kind == "cgroup2" else ("memory", "memory.max_usage_in_bytes")
        if self.driver.kind != "none":
            with contextlib.suppress(OSError, ValueError, KeyError):
                st.memory_peak = int(read_control(self._file(*peak)))
        return st

    def memory_room(self) -> int | None:
        """Bytes its processes may still use before the memory limit (None: no memory cgroup)."""
        names = {"cgroup2": ("memory.max", "memory.current"),
                 "cgroup1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}.get(self.driver.kind)
        if names is None:
            return None
        try:
            limit, current = (read_control(self._file("memory", n)).strip() for n in names)
            return None if limit == "max" else max(0, int(limit) - int(current))
        except (OSError, ValueError) as e:
            log.warning("reading the memory of %s: %s", self.dirs, e)
            return None

    def stats(self) -> CgroupStats:
        st = CgroupStats(cpu_usage_ns=self.cpu_usage_ns())
        try:
            if self.driver.kind == "cgroup2":
                events = keyed(read_control(self._file("memory", "memory.events")))
                st.oom_kills = events.get("oom_kill", 0)
                st.memory_max_hits = events.get("max", 0)
                with contextlib.suppress(FileNotFoundError):  # memory.peak: Linux 5.19 on
                    st.memory_peak = int(read_control(self._file("memory", "memory.peak")))
                st.pids_max_hits = keyed(read_control(self._file("pids", "pids.events"))).get("max", 0)
            elif self.driver.kind == "cgroup1":
                st.oom_kills = keyed(read_control(self._file("memory", "memory.oom_control"))).get("oom_kill", 0)
                st.memory_max_hits = int(read_control(self._file("memory", "memory.failcnt")))
                st.memory_peak = int(read_control(self._file("memory", "memory.max_usage_in_bytes")))
                st.pids_max_hits = keyed(read_control(self._file("pids", "pids.events"))).get("max", 0)
        except (OSError, ValueError) as e:
            log.warning("reading cgroup stats of %s: %s", self.dirs, e)
        return st

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files:
            try:
                out.update(int(x) for x in read_control(f).split())
            except OSError:
                pass
        return sorted(out)

    def kill(self) -> None:
        """Kill every process in the cgroup."""
        if self.driver.kind == "cgroup2":
            kill_file = os.path.join(self.dirs["v2"], "cgroup.kill")
            if os.path.exists(kill_file):
                try:
                    write_control(kill_file, "1")
                    return
                except OSError as e:
                    log.warning("cgroup.kill in %s: %s", self.dirs["v2"], e)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, timeout: float = 0.0, include_kept: bool = False) -> bool:
        """Remove the worker's directories (not the slot's), killing stragglers.

        True when all are gone.  With ``timeout`` 0 it never sleeps (the daemon retries
        from its event loop); start-up clean-up passes a timeout and may wait.
        """
        deadline = time.monotonic() + timeout
        for d in sorted(set(self.dirs.values())):
            if d in self.kept and not include_kept:
                continue
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        log.error("cannot remove cgroup %s: %s", d, e)
                        return False
                    self.kill()
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.005)
        return True


class CgroupDriver:
    """Creates worker cgroups under ``<daemon's cgroup>/<parent>``."""

    def __init__(self, kind: str, bases: dict[str, str], enable: str = "") -> None:
        self.kind = kind  # "cgroup2", "cgroup1" or "none"
        self.bases = bases  # "v2" or controller -> parent directory for workers
        self.enable = enable  # v2: controllers to enable in the parent's subtree_control
        self.has_cpu = "cpu" in bases or "+cpu" in enable.split()
        self.has_memsw = "memory" in bases and os.path.exists(os.path.join(bases["memory"],
                                                                           "memory.memsw.limit_in_bytes"))
        self._seq = 0
        self._lock_fd = -1

    def lock(self) -> None:
        """Hold an exclusive lock on the parent: two daemons must never share one."""
        if not self.bases:
            return
        base = sorted(set(self.bases.values()))[0]
        fd = try_lock(base)
        if fd is None:
            raise CgroupInUse(f"another sandboxd is using the cgroup parent {base}; give each daemon its own "
                              "jail.cgroup_parent")
        self._lock_fd = fd

    def _mkdir(self, base: str, d: str) -> None:
        try:
            os.mkdir(d)
        except FileNotFoundError:
            # The parent vanished (removed by hand?): recreate it and carry on.
            log.warning("cgroup parent %s was missing; recreating it", base)
            os.makedirs(base, exist_ok=True)
            if self.kind == "cgroup2" and self.enable:
                write_control(os.path.join(base, "cgroup.subtree_control"), self.enable)
            os.mkdir(d)

    def create(self, name: str, limits: Limits, slot: int) -> WorkerCgroup:
        """Cgroups for one worker.  On v1 the ``cpu`` and ``cpuacct`` ones belong to the uid
        slot and are reused: removing them after a run costs 0.5-1.5 ms (measured, blocking),
        against tens of microseconds for memory and pids, and they hold no counter a run
        needs that is not read as a difference anyway."""
        if self.kind == "none":
            return WorkerCgroup(self, {})
        cg = self._make(name, self.bases, slot)
        try:
            self._no_swap(cg)
            cg.set_limits(limits)
        except BaseException:
            cg.remove()
            raise
        return cg

    def create_build(self, name: str, memory: int, pids: int) -> WorkerCgroup:
        """The cgroup of one environment build: memory (swap off) and pids, and on v1 no
        cpu or cpuacct group (the build's CPU stays the daemon's).  On v2 the kernel kills
        the whole build at once when it reaches its memory limit (``memory.oom.group``); on
        v1 it kills the largest process, which ends the build as well (the caller fails a
        build with any OOM kill).  Its directories are removed as a worker's are."""
        if self.kind == "none":
            return WorkerCgroup(self, {})
        keys = ("v2",) if self.kind == "cgroup2" else ("memory", "pids")
        cg = self._make(name, {k: b for k, b in self.bases.items() if k in keys}, None)
        try:
            self._no_swap(cg)
            cg.set_memory_and_pids(memory, pids)
            group = os.path.join(cg.dirs.get("v2", ""), "memory.oom.group")
            if self.kind == "cgroup2" and os.path.exists(group):
                write_control(group, "1")
        except BaseException:
            cg.remove()
            raise
        return cg

    def _make(self, name: str, bases: dict[str, str], slot: int | None) -> WorkerCgroup:
        self._seq += 1
        dirs: dict[str, str] = {}
        kept: set[str] = set()
        for key, base in bases.items():
            if self.kind == "cgroup1" and key in SLOT_SCOPED and slot is not None:
                d = os.path.join(base, f"slot{slot}")
                if not os.path.isdir(d):
                    self._mkdir(base, d)
                kept.add(d)
            else:
                d = os.path.join(base, f"{name}.{self._seq}")
                if d not in dirs.values():
                    self._mkdir(base, d)
            dirs[key] = d
        return WorkerCgroup(self, dirs, frozenset(kept))

    def _no_swap(self, cg: WorkerCgroup) -> None:
        if self.kind == "cgroup1":
            swappiness = os.path.join(cg.dirs["memory"], "memory.swappiness")
            if os.path.exists(swappiness):
                write_control(swappiness, "0")
        else:
            swap = os.path.join(cg.dirs["v2"], "memory.swap.max")
            if os.path.exists(swap):
                write_control(swap, "0")

    def cleanup_stale(self) -> list[str]:
        """Kill and remove worker cgroups left by an earlier daemon. Returns what was removed."""
        removed = []
        groups: dict[str, dict[str, str]] = {}
        for key, base in self.bases.items():
            try:
                names = os.listdir(base)
            except FileNotFoundError:
                continue
            for n in names:
                if os.path.isdir(os.path.join(base, n)):
                    groups.setdefault(n, {})[key] = os.path.join(base, n)
        for n, dirs in groups.items():
            if WorkerCgroup(self, dirs).remove(timeout=5.0, include_kept=True):
                removed.append(n)
        return removed

    def close(self) -> None:
        """Remove the slots' directories and the (empty) parents at shutdown."""
        self.cleanup_stale()
        for base in sorted(set(self.bases.values())):
            try:
                os.rmdir(base)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove %s: %s", base, e)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "bases": dict(self.bases)}
