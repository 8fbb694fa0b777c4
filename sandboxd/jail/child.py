"""The worker's setup, as ordered lists of named steps that fail closed.

Two processes make a worker.  The fork server forks P straight into a new pid
namespace, so P is the run's pid 1 and reaper.  P's steps:

    fds -> signals -> cgroup -> namespaces -> scratch -> root -> credentials
        -> rlimits -> dumpable -> parent_death -> fork

(the cgroup is joined before the mount namespace is entered, while the host's
cgroupfs is still visible; the pid namespace already exists from the fork).  P then
forks R, the runner, whose steps are

    stdio -> fds -> session -> no_new_privs -> seccomp

after which R is fully confined and waits for its code (``runtime``), while P becomes
the supervisor (``supervisor``).  Any step that raises ends the process: P writes a
``setup_error`` frame naming the step and errno to the status pipe; R writes the
same into the shared handoff page and exits with ``EXIT_SETUP``.  No path returns
to fork-server code: everything ends in ``os._exit``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from .. import protocol
from . import credentials, libc, limits, mounts
from .spec import Handoff, WorkerSpec

# P's descriptors after the "fds" step.
FD_STATUS, FD_CTRL, FD_STDIN, FD_STDOUT, FD_STDERR, FD_LIFELINE, FD_TEMPLATE = range(3, 10)
# R's descriptors after its "fds" step (0-2 are the run's stdio).
R_FD_CTRL, R_FD_LISTENER_SOCK = 3, 4

EXIT_SETUP = 121  # a runner setup step failed (details in the handoff page)


@dataclass(frozen=True)
class ServerState:
    """What the fork server prepared once, inherited by every worker through fork."""

    template_fd: int
    lifeline_fd: int
    filters: dict[str, bytes]
    supervisor_filter: bytes
    syscall_names: dict[int, str]
    audit_arch: int
    cap_last: int
    run_path: tuple[str, ...]
    foreign_modules: tuple[str, ...]
    base_env: dict[str, str]


class StepFailure(Exception):
    def __init__(self, step: str, err: int, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step, self.errno, self.message = step, err, message


def run_steps(steps: Sequence[tuple[str, Callable[[], object]]]) -> dict[str, int]:
    """Run the steps in order; return how long each took, in microseconds."""
    took: dict[str, int] = {}
    for name, fn in steps:
        t0 = time.monotonic_ns()
        try:
            fn()
        except OSError as e:
            raise StepFailure(name, e.errno or 0, str(e)) from e
        except Exception as e:
            raise StepFailure(name, 0, f"{type(e).__name__}: {e}") from e
        took[name] = (time.monotonic_ns() - t0) // 1000
    return took


def remap_fds(fds: Sequence[int], start: int) -> None:
    """Place ``fds`` at ``start``, ``start+1``, ... and close every other fd from ``start`` on."""
    # Temporaries land above the target range, so no dup2 below clobbers a source.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, start + len(fds)) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, start + i)
    os.closerange(start + len(fds), 2**31 - 1)


def write_frame(fd: int, obj: object) -> None:
    data = memoryview(protocol.encode(obj))
    while data:
        n = os.write(fd, data)
        data = data[n:]


# -- P: the run's pid 1 -------------------------------------------------------------------


def supervisor_main(spec: WorkerSpec, state: ServerState, fds: Sequence[int]) -> NoReturn:
    """Entry point of P, right after the fork server's fork. Never returns."""
    try:
        libc.set_name("sbx-super")
        try:
            timings = _supervisor_setup(spec, state, fds)
            t0 = time.monotonic_ns()
            runner_pid, handoff, listener, runner_timings, started_fd = _fork_runner(spec, state)
            timings["runner"] = (time.monotonic_ns() - t0) // 1000
            timings.update({f"runner.{k}": v for k, v in runner_timings.items()})
        except StepFailure as f:
            write_frame(FD_STATUS, {"t": "setup_error", "step": f.step, "errno": f.errno, "message": f.message})
            os._exit(EXIT_SETUP)
        supervisor.supervise(spec, state, runner_pid, handoff, listener, timings, started_fd)
    except BaseException as e:  # noqa: BLE001 - last resort: report, never fall back
        try:
            write_frame(FD_STATUS, {"t": "setup_error", "step": "supervisor", "errno": 0,
                                    "message": f"{type(e).__name__}: {e}"})
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(EXIT_SETUP)


def _supervisor_setup(spec: WorkerSpec, state: ServerState, fds: Sequence[int]) -> dict[str, int]:
    net = 0 if spec.network else libc.CLONE_NEWNET
    ns_flags = libc.CLONE_NEWIPC | libc.CLONE_NEWUTS | libc.CLONE_NEWCGROUP | net

    def join_cgroups() -> None:
        for procs in spec.cgroup_procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def namespaces() -> None:
        mounts.join_template(FD_TEMPLATE, ns_flags)
        os.close(FD_TEMPLATE)
        socket.sethostname(spec.hostname)

    def root() -> None:
        os.chdir("/work")
        mounts.check_root()
        null = os.open("/dev/null", os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)

    return run_steps([
        ("fds", lambda: remap_fds(fds, FD_STATUS)),
        ("signals", _default_signals),
        ("cgroup", join_cgroups),
        ("namespaces", namespaces),
        ("scratch", lambda: mounts.mount_scratch(spec.uid, spec.gid, spec.scratch_bytes, spec.scratch_inodes)),
        ("root", root),
        ("credentials", lambda: credentials.drop(spec.uid, spec.gid, state.cap_last)),
        ("rlimits", lambda: limits.apply(spec.rlimits)),
        ("dumpable", lambda: libc.prctl(libc.PR_SET_DUMPABLE, 0)),
        ("parent_death", lambda: libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)),
    ])


def _default_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _fork_runner(spec: WorkerSpec, state: ServerState) -> tuple[int, Handoff, int, dict[str, int], int]:
    """Fork R; return its pid, the handoff page, R's seccomp listener (-1 if R failed), R's step
    times, and the socket on which R says, just before user code, that setup is over."""
    handoff = Handoff(mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS))
    psock, rsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError as e:
        raise StepFailure("fork", e.errno or 0, str(e)) from e
    if pid == 0:
        try:
            psock.close()
            _runner_main(spec, state, handoff, rsock.detach())
        finally:
            os._exit(EXIT_SETUP)
    rsock.close()
    for fd in (FD_CTRL, FD_STDIN, FD_STDOUT, FD_STDERR):
        os.close(fd)
    try:
        msg, listener, _flags, _addr = socket.recv_fds(psock, 4096, 1)
    except OSError:
        msg, listener = b"", []
    started_fd = psock.detach()
    try:
        timings = msgpack.unpackb(msg) if msg else {}
    except ValueError:
        timings = {}
    # No listener means the runner died in setup; the supervisor reports it from the handoff.
    return pid, handoff, listener[0] if listener else -1, timings, started_fd


# -- R: the runner ------------------------------------------------------------------------


def _runner_main(spec: WorkerSpec, state: ServerState, handoff: Handoff, sock_fd: int) -> NoReturn:
    def stdio() -> None:
        os.dup2(FD_STDIN, 0)
        os.dup2(FD_STDOUT, 1)
        os.dup2(FD_STDERR, 2)

    def no_new_privs() -> None:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        if libc.prctl(libc.PR_GET_NO_NEW_PRIVS) != 1:
            raise OSError(1, "no_new_privs did not stick")

    listener = -1

    def load_seccomp() -> None:
        nonlocal listener
        listener = libc.seccomp_load(state.filters[spec.filter_key], new_listener=True)

    libc.set_name("sbx-runner")
    try:
        timings = run_steps([
            ("stdio", stdio),
            ("fds", lambda: remap_fds([FD_CTRL, sock_fd], R_FD_CTRL)),
            ("session", os.setsid),
            ("no_new_privs", no_new_privs),
            ("prepare", lambda: runtime.prepare(state)),  # trusted interpreter housekeeping, no user input
            ("seccomp", load_seccomp),  # last
        ])
        # Hand the listener to the supervisor; it answers refused calls from here on.
        sock = socket.socket(fileno=R_FD_LISTENER_SOCK)
        socket.send_fds(sock, [msgpack.packb(timings)], [listener])
        os.close(listener)
        sock.detach()  # kept: runtime.serve_one says "started" on it, then closes it
    except (StepFailure, OSError) as f:
        step = f.step if isinstance(f, StepFailure) else "listener"
        handoff.write(Handoff.SETUP, step, getattr(f, "errno", 0) or 0, message=str(f))
        os._exit(EXIT_SETUP)
    runtime.serve_one(handoff, killed_when_done=bool(spec.cgroup_procs))


# At the end: these two import names from this module.  Workers reach them as module
# attributes, never through an import statement: the fork server drops the daemon's
# modules from sys.modules, and inside the root there is nothing to import them from.
from . import runtime, supervisor  # noqa: E402
