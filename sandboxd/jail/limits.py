"""Resource limits by name: the pool's ceilings at worker start, each run's own before its code.

Soft and hard are set equal: a run can never raise a limit back.  ``CORE`` is always
0 and ``MEMLOCK``/``MSGQUEUE``/``RTPRIO`` are 0 because nothing in a run needs them.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping

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


def apply(limits: Mapping[str, int]) -> None:
    """Set each named limit (soft = hard); values above the current hard limit are lowered to it."""
    for name, value in {**limits, **ALWAYS}.items():
        which = RLIMITS[name]
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and (value < 0 or value > hard):
            value = hard
        resource.setrlimit(which, (value, value))
