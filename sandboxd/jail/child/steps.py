"""P, the run's pid 1: its setup as an ordered list of named steps that fail closed.

Two processes make a worker.  The fork server forks P straight into a new pid
namespace, so P is the run's pid 1 and reaper.  P's steps, in order:

    fds -> signals -> cgroup -> namespaces -> scratch -> root -> credentials
        -> rlimits -> dumpable -> parent_death

(the cgroup is joined before the mount namespace is entered, while the host's
cgroupfs is still visible; the pid namespace already exists from the fork).  P then
forks R, the runner (``runner``), whose own steps end with seccomp, and becomes the
run's supervisor (``supervisor``).  Any step that raises ends P with a ``setup_error``
frame on the status pipe naming the step and errno.  No path returns to fork-server
code: everything ends in ``os._exit``.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from ..kernel import credentials, libc, mounts
from ..policy import limits
from . import runner, supervisor
from .contract import (
    EXIT_SETUP,
    FD_REQUEST,
    FD_STATUS,
    FD_STDERR,
    FD_STDIN,
    FD_STDOUT,
    FD_TEMPLATE,
    Become,
    Handoff,
    RunnerArgs,
    ServerState,
    SetupError,
    Step,
    WorkerSpec,
    remap_fds,
    run_steps,
    write_frame,
)


@dataclass(frozen=True)
class Setup:
    """What P's steps work from: the spec, the fork server's state, the fds it was given."""

    spec: WorkerSpec
    state: ServerState
    fds: Sequence[int]


def place_fds(s: Setup) -> None:
    """Only the worker's pipes remain, at FD_STATUS .. FD_TEMPLATE, then its cgroups."""
    remap_fds(s.fds, FD_STATUS)


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
    mounts.mount_scratch(s.spec.uid, s.spec.gid, s.spec.scratch_bytes, s.spec.scratch_inodes)


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
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)


SUPERVISOR_STEPS: tuple[Step[Setup], ...] = (
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


def supervisor_main(spec: WorkerSpec, state: ServerState, fds: Sequence[int]) -> NoReturn:
    """Entry point of P, from a clean stack after the fork server's fork. Never returns."""
    try:
        libc.set_name("sbx-super")
        timings = run_steps(SUPERVISOR_STEPS, Setup(spec, state, fds))
        t0 = time.monotonic_ns()
        forked = _fork_runner(spec, state)  # in R, this raises Become: R unwinds P's stack
        timings["runner"] = (time.monotonic_ns() - t0) // 1000
        timings.update({f"runner.{k}": v for k, v in forked.timings.items()})
        supervisor.supervise(spec, state, forked.pid, forked.handoff, forked.listener, timings, forked.link)
    except Become:
        raise
    except BaseException as e:  # noqa: BLE001 - report, never fall back
        error = e if isinstance(e, SetupError) else SetupError.from_os_error("supervisor", e)
        try:
            write_frame(FD_STATUS, {"t": "setup_error", **error.to_dict()})
        except BaseException:  # noqa: BLE001
            pass
        os._exit(EXIT_SETUP)


@dataclass(frozen=True)
class ForkedRunner:
    pid: int
    handoff: Handoff
    listener: int  # R's seccomp listener; -1 if R died in setup (the handoff page says why)
    timings: dict[str, int]
    link: int  # P's end of the link: R says LINK_STARTED on it just before user code


def _fork_runner(spec: WorkerSpec, state: ServerState) -> ForkedRunner:
    handoff = Handoff(mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError as e:
        raise SetupError.from_os_error("fork", e) from e
    if pid == 0:
        ours.close()
        args = RunnerArgs(state.filters[spec.filter_key], state.base_env, state.run_path, bool(spec.cgroups),
                          spec.exec_argv)
        raise Become(runner.runner_main, args, handoff, theirs.detach())
    theirs.close()
    for fd in (FD_REQUEST, FD_STDIN, FD_STDOUT, FD_STDERR):
        os.close(fd)
    try:
        msg, listener, _flags, _addr = socket.recv_fds(ours, 4096, 1)
    except OSError:
        msg, listener = b"", []
    try:
        timings = msgpack.unpackb(msg) if msg else {}
    except ValueError:
        timings = {}
    return ForkedRunner(pid, handoff, listener[0] if listener else -1, timings, ours.detach())
