"""Resource limits by name: the pool's ceilings at worker start, each run's own before its code.

Soft and hard are set equal: a run can never raise a limit back.  ``CORE`` is always
0 and ``MEMLOCK``/``MSGQUEUE``/``RTPRIO`` are 0 because nothing in a run needs them.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Mapping
from dataclasses import dataclass

RLIMITS = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "stack": resource.RLIMIT_STACK,
    "core": resource.RLIMIT_CORE,
    "memlock": resource.RLIMIT_MEMLOCK,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
    "rtprio": resource.RLIMIT_RTPRIO,
}
ALWAYS = {"core": 0, "memlock": 0, "msgqueue": 0, "rtprio": 0}


def nproc_for(pids: int, cgroup: bool) -> int:
    """RLIMIT_NPROC for a run allowed ``pids`` tasks.

    Without a pids cgroup it is the limit (sandboxd-init and the runner share the
    run's uid).  With one it is only a backstop, far enough above: a fork bomb whose
    processes die as fast as they fork reaches RLIMIT_NPROC before pids.max at twice
    the limit in about one run in ten (measured), and that EAGAIN leaves no pids event
    to report ``pids_limit`` from.  At four times plus 64 it never did.
    """
    return 4 * pids + 64 if cgroup else pids + 2


STACK_BYTES = 8 << 20


@dataclass(frozen=True)
class RlimitPolicy:
    """The one formula for a run's rlimits, from its memory, CPU, file and process limits.

    ``as_base`` is the interpreter's own address space (the fork server's VmSize plus a
    margin).  With a cgroup, memory is the cgroup's job and RLIMIT_AS gets ``as_slack`` on
    top (glibc arenas and thread stacks are address space, not memory); without one the
    memory limit is RLIMIT_AS itself.  A pooled worker starts with the ceilings of the
    largest run; each run lowers them to its own before its code starts.
    """

    as_base: int
    as_slack: int
    cgroup: bool
    unlimited_as: bool = False

    def for_limits(self, *, memory: int, cpu_ms: int, file_size: int, nofile: int, pids: int) -> dict[str, int]:
        return {
            "as": -1 if self.unlimited_as else self.as_base + memory + (self.as_slack if self.cgroup else 0),
            "cpu": math.ceil(cpu_ms / 1000) + 1,
            "fsize": file_size,
            "nofile": nofile,
            "nproc": nproc_for(pids, self.cgroup),
            "stack": STACK_BYTES,
        }


def apply(limits: Mapping[str, int]) -> None:
    """Set each named limit (soft = hard; -1: unlimited); values above the current hard limit are lowered to it."""
    for name, value in {**limits, **ALWAYS}.items():
        which = RLIMITS[name]
        _soft, hard = resource.getrlimit(which)
        if value < 0:
            value = resource.RLIM_INFINITY
        if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
            value = hard
        resource.setrlimit(which, (value, value))
