"""The worker's confinement: an ordered list of named steps that fail closed, done by R as root.

The fork server makes a worker's pid 1 and R together (``_spawn``): pid 1 forks R, drops
to the run's uid and execs ``sandboxd-init``; R, pid 2 of the new pid namespace, starts
as the fork server's copy and does these steps, in order:

    signals -> fds -> init -> lifeline -> cgroup -> namespaces -> scratch -> root
        -> credentials -> rlimits -> dumpable

(the cgroup is joined before the mount namespace is entered, while the host's cgroupfs
is still visible; the pid namespace already exists).  Then its own (``runner``), which
end with seccomp.  Any step that raises ends R with a ``LINK_SETUP_ERROR`` message on the
link naming the step and errno -- never with user code running less confined.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ..kernel import credentials, libc, mounts
from ..policy import limits
from .contract import (
    FD_LIFELINE,
    FD_LINK,
    FD_SYNC,
    FD_TEMPLATE,
    HANDOFF_FILE,
    Handoff,
    ServerState,
    Step,
    WorkerSpec,
    remap_fds,
)


@dataclass
class Setup:
    """What the steps work from: the spec, the fork server's state, the fds it handed over;
    and what they make (the scratch's top, the handoff page)."""

    spec: WorkerSpec
    state: ServerState
    fds: Sequence[int]
    scratch_fd: int = -1
    handoff: Handoff | None = None
    link: int = -1  # where a setup error is reported: the link, wherever it is now

    def __post_init__(self) -> None:
        self.link = self.fds[0]


def default_signals(s: Setup) -> None:
    """Default dispositions and an empty mask (R was born with every signal blocked)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def place_fds(s: Setup) -> None:
    """Only the worker's pipes remain, at FD_LINK .. FD_SYNC, then its netns and cgroups:
    nothing else of the fork server's (its socket to the daemon, other workers') is left."""
    remap_fds(s.fds, FD_LINK)
    s.link = FD_LINK


def wait_for_init(s: Setup) -> None:
    """Pid 1 says (one byte) once it runs as the run's uid, about to exec sandboxd-init."""
    if os.read(FD_SYNC, 1) != b"\x01":
        raise OSError(0, "pid 1 did not get to sandboxd-init")
    os.close(FD_SYNC)


def check_lifeline(s: Setup) -> None:
    """The fork server is still there (else nothing would end this worker: pid 1's
    PDEATHSIG, set before the byte above, fires only for a death after it)."""
    ready, _, _ = select.select([FD_LIFELINE], [], [], 0)
    if ready:
        raise OSError(0, "the fork server is gone")
    os.close(FD_LIFELINE)


def join_cgroup(s: Setup) -> None:
    """Write 0 ("this process") into each cgroup.procs the daemon opened for this worker."""
    for fd in s.spec.cgroup_fds():
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def enter_namespaces(s: Setup) -> None:
    """mount (a copy of the template), ipc, uts, cgroup, and net: an empty one, or for a run
    with network the one the daemon made ready (its own interface, address and route)."""
    netns = s.spec.netns_fd()
    if netns is not None:
        libc.setns(netns, libc.CLONE_NEWNET)
        os.close(netns)
    net = 0 if netns is not None else libc.CLONE_NEWNET
    mounts.join_template(FD_TEMPLATE, libc.CLONE_NEWIPC | libc.CLONE_NEWUTS | libc.CLONE_NEWCGROUP | net)
    os.close(FD_TEMPLATE)
    socket.sethostname(s.spec.hostname)


def mount_scratch(s: Setup) -> None:
    """The scratch filesystem, an fd of its top for the daemon, and in that top (which no path
    of the run reaches) the handoff page, mapped: the mapping stays, no fd of it does."""
    s.scratch_fd = mounts.mount_scratch(s.spec.uid, s.spec.gid, s.spec.scratch_bytes, s.spec.scratch_inodes)
    fd = os.open(HANDOFF_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=s.scratch_fd)
    try:
        os.ftruncate(fd, Handoff.SIZE)
        s.handoff = Handoff(mmap.mmap(fd, Handoff.SIZE, mmap.MAP_SHARED))
    finally:
        os.close(fd)


def enter_root(s: Setup) -> None:
    os.chdir("/work")
    mounts.check_root(s.state.root_id)


def drop_credentials(s: Setup) -> None:
    credentials.drop(s.spec.uid, s.spec.gid, s.state.cap_last)


def set_rlimits(s: Setup) -> None:
    limits.apply(s.spec.rlimits)


def not_dumpable(s: Setup) -> None:
    libc.prctl(libc.PR_SET_DUMPABLE, 0)


WORKER_STEPS: tuple[Step[Setup], ...] = (
    Step("signals", default_signals),
    Step("fds", place_fds),
    Step("init", wait_for_init),
    Step("lifeline", check_lifeline),
    Step("cgroup", join_cgroup),
    Step("namespaces", enter_namespaces),
    Step("scratch", mount_scratch),
    Step("root", enter_root),
    Step("credentials", drop_credentials),
    Step("rlimits", set_rlimits),
    Step("dumpable", not_dumpable),
)
