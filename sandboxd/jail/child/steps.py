"""Pid 1 of a worker: its setup as an ordered list of named steps that fail closed, then R,
then ``sandboxd-init``.

The fork server forks this process straight into a new pid namespace, so it is the run's
pid 1.  Its steps, in order:

    fds -> signals -> cgroup -> namespaces -> scratch -> root -> credentials
        -> rlimits -> dumpable -> parent_death

(the cgroup is joined before the mount namespace is entered, while the host's cgroupfs
is still visible; the pid namespace already exists from the fork).  Everything the steps
set up, R inherits: this process then forks R, the runner (``runner``, pid 2), whose own
steps end with seccomp, and execs ``sandboxd-init`` from the fd the fork server opened --
a static C program that reaps the namespace and reports R's wait status and rusage on the
status pipe.  So the only CPython that lives through a run is R; this one is an
interpreter for the few hundred microseconds of its steps, then a few pages of C.

Any step that raises ends the process with a ``LINK_SETUP_ERROR`` message on the link
naming the step and errno.  No path returns to fork-server code: everything ends in
``os._exit`` or the exec.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from ..kernel import credentials, libc, mounts
from ..policy import limits
from . import runner
from .contract import (
    EXIT_SETUP,
    FD_INIT,
    FD_LIFELINE,
    FD_LINK,
    FD_STATUS,
    FD_TEMPLATE,
    HANDOFF_FILE,
    LINK_SETUP_ERROR,
    Become,
    Handoff,
    RunnerArgs,
    ServerState,
    SetupError,
    Step,
    WorkerSpec,
    remap_fds,
    run_steps,
)

INIT_NAME = "sandboxd-init"


@dataclass
class Setup:
    """What the steps work from: the spec, the fork server's state, the fds it was given;
    and what they make for R (the scratch's top, the handoff page)."""

    spec: WorkerSpec
    state: ServerState
    fds: Sequence[int]
    scratch_fd: int = -1
    handoff: Handoff | None = None
    link: int = -1  # where a setup error is reported: the link, wherever it is now

    def __post_init__(self) -> None:
        self.link = self.fds[1]


def place_fds(s: Setup) -> None:
    """Only the worker's pipes remain, at FD_STATUS .. FD_INIT, then its netns and cgroups."""
    remap_fds(s.fds, FD_STATUS)
    s.link = FD_LINK


def default_signals(s: Setup) -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


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
    of the run reaches) the handoff page, mapped here: R inherits the mapping, not an fd."""
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
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)


def drop_credentials(s: Setup) -> None:
    credentials.drop(s.spec.uid, s.spec.gid, s.state.cap_last)


def set_rlimits(s: Setup) -> None:
    limits.apply(s.spec.rlimits)


def not_dumpable(s: Setup) -> None:
    libc.prctl(libc.PR_SET_DUMPABLE, 0)


def die_with_fork_server(s: Setup) -> None:
    """PDEATHSIG (it survives the exec of sandboxd-init); a fork server already gone by now
    shows as EOF on the lifeline, which closes the window before the prctl."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    ready, _, _ = select.select([FD_LIFELINE], [], [], 0)
    if ready:
        raise OSError(0, "the fork server is gone")
    os.close(FD_LIFELINE)


WORKER_STEPS: tuple[Step[Setup], ...] = (
    Step("fds", place_fds),
    Step("signals", default_signals),
    Step("cgroup", join_cgroup),
    Step("namespaces", enter_namespaces),
    Step("scratch", mount_scratch),
    Step("root", enter_root),
    Step("credentials", drop_credentials),
    Step("rlimits", set_rlimits),
    Step("dumpable", not_dumpable),
    Step("parent_death", die_with_fork_server),
)


def worker_main(spec: WorkerSpec, state: ServerState, fds: Sequence[int]) -> NoReturn:
    """Entry point of pid 1, from a clean stack after the fork server's fork. Never returns."""
    setup = Setup(spec, state, fds)
    try:
        libc.set_name("sbx-pid1")
        timings = run_steps(WORKER_STEPS, setup)
        assert setup.handoff is not None
        args = RunnerArgs(state.filters[spec.filter_key], state.base_env, state.run_path, setup.scratch_fd,
                          spec.exec_argv)
        try:
            pid = os.fork()
        except OSError as e:
            raise SetupError.from_os_error("fork", e) from e
        if pid == 0:
            raise Become(runner.runner_main, args, setup.handoff, timings)  # R: unwinds this stack
        exec_init(pid)
    except Become:
        raise
    except BaseException as e:  # noqa: BLE001 - report, never fall back
        error = e if isinstance(e, SetupError) else SetupError.from_os_error("worker", e)
        report_setup_error(setup.link, error)
        os._exit(EXIT_SETUP)


def exec_init(runner_pid: int) -> NoReturn:
    """Become sandboxd-init: fd 1 its report pipe, R its one child to report."""
    os.dup2(FD_STATUS, 1)
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    try:
        os.execve(FD_INIT, [INIT_NAME, str(runner_pid)], {})
    except OSError as e:
        report_setup_error(FD_LINK, SetupError.from_os_error("init", e))
    os._exit(EXIT_SETUP)


def report_setup_error(fd: int, error: SetupError) -> None:
    """A step failed: say which on the link (a SOCK_SEQPACKET message, whole or not at all)."""
    try:
        os.write(fd, LINK_SETUP_ERROR + msgpack.packb(error.to_dict()))
    except BaseException:  # noqa: BLE001 - the daemon then sees the worker end in setup
        pass
