"""R, the runner: the worker's steps, its own, seccomp last, then the wait for its one request.

R starts as the fork server's copy, pid 2 of a new pid namespace, as root; it does the
worker's confinement (``steps``: namespaces, cgroup, scratch, root, the run's uid,
rlimits) and then its own steps, in order:

    stdio -> fds -> session -> no_new_privs -> prepare -> seccomp

``prepare`` is trusted interpreter housekeeping (a fresh environment, sys.path, stdio
objects, a warm-up of the release path) done while no user input exists.  The filter
is loaded last.  Then R arms the daemon: ``LINK_ARMED`` on the link with the steps'
timings and three fds -- the filter's listener (the daemon answers refused calls from
now on), a pidfd of R (for a session's interrupts), the scratch filesystem's top (for
``out/`` and the handoff page) -- and says ``LINK_READY``.  Any step that raises sends
``LINK_SETUP_ERROR`` naming it, writes it into the handoff page, and ends R with
``EXIT_SETUP``.  Then R is fully confined and waits for its request (``runtime``).
"""

from __future__ import annotations

import builtins
import io
import os
import socket
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from ...common import protocol
from ..kernel import libc
from . import preload, runtime, steps
from .contract import (
    EXIT_SETUP,
    FD_LINK,
    FD_REQUEST,
    FD_STDERR,
    FD_STDIN,
    FD_STDOUT,
    LINK_ARMED,
    LINK_READY,
    LINK_SETUP_ERROR,
    R_FD_LINK,
    R_FD_REQUEST,
    Handoff,
    RunnerArgs,
    RunRequest,
    ServerState,
    SetupError,
    Step,
    WorkerSpec,
    remap_fds,
    run_steps,
)

R_FD_SCRATCH, R_FD_PIDFD = R_FD_LINK + 1, R_FD_LINK + 2  # until they are handed to the daemon


@dataclass
class Setup:
    args: RunnerArgs
    link: int = FD_LINK  # R's end of the link (placed at R_FD_LINK by the fds step)
    sock: socket.socket | None = None  # the link as a socket, made before the filter is loaded
    listener: int = -1  # the seccomp listener, once the filter is loaded


def stdio(s: Setup) -> None:
    os.dup2(FD_STDIN, 0)
    os.dup2(FD_STDOUT, 1)
    os.dup2(FD_STDERR, 2)


def place_fds(s: Setup) -> None:
    """Only the request pipe, the link and (until they are handed over) the scratch and a
    pidfd of R remain.  Everything arming needs is made here, before the filter: until the
    daemon holds the listener, a refused call would wait for an answer nobody gives."""
    pidfd = os.pidfd_open(os.getpid())
    remap_fds([FD_REQUEST, FD_LINK, s.args.scratch_fd, pidfd], R_FD_REQUEST)
    s.link = R_FD_LINK
    s.sock = socket.socket(fileno=R_FD_LINK)


def new_session(s: Setup) -> None:
    os.setsid()


def no_new_privs(s: Setup) -> None:
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    if libc.prctl(libc.PR_GET_NO_NEW_PRIVS) != 1:
        raise OSError(1, "no_new_privs did not stick")


def prepare(s: Setup) -> None:
    """A fresh interpreter state for user code, made before the worker waits in the pool."""
    os.environ.clear()
    os.environ.update(s.args.base_env)
    sys.argv = ["-c"]
    sys.orig_argv[:] = [sys.executable, "-c"]  # not the fork server's bootstrap line
    sys.path[:] = ["", *s.args.run_path]
    keep = set(s.args.run_path)
    for key in list(sys.path_importer_cache):
        if key not in keep:
            del sys.path_importer_cache[key]
    stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                              errors="backslashreplace", line_buffering=True)
    sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = stdin, stdout, stderr  # type: ignore[misc]
    _warm_up()


def _warm_up() -> None:
    """Walk the release path once on dummy data.

    The worker shares its memory copy-on-write with the fork server; the first write to
    each page costs a fault and a copy.  Decoding a request, compiling and printing here,
    while the worker waits, takes those faults off the run's own clock.
    """
    sample = protocol.encode(RunRequest("import sys\nprint('warm', sys.argv)\n" * 8, {"nofile": 64},
                                        {"a.txt": b"x" * 64}, {"A": "1"}).to_wire())
    decoder = protocol.FrameDecoder(len(sample))
    decoder.feed(sample)
    request = RunRequest.from_wire(decoder.next_frame())
    code = compile(request.code, runtime.FILENAME, "exec")
    scratch = io.StringIO()
    exec(code, {"__builtins__": builtins, "print": lambda *a, **k: print(*a, **k, file=scratch)})
    types.ModuleType("__main__")


def load_seccomp(s: Setup) -> None:
    s.listener = libc.seccomp_load(s.args.filter, new_listener=True)


RUNNER_STEPS: tuple[Step[Setup], ...] = (
    Step("stdio", stdio),
    Step("fds", place_fds),
    Step("session", new_session),
    Step("no_new_privs", no_new_privs),
    Step("prepare", prepare),
    Step("seccomp", load_seccomp),  # last
)
# An exec runtime (nodejs) has no interpreter state of ours to prepare: R execs it, confined.
EXEC_RUNNER_STEPS = tuple(step for step in RUNNER_STEPS if step.name != "prepare")


def runner_main(spec: WorkerSpec, state: ServerState, fds: Sequence[int]) -> NoReturn:
    """Entry point of R, from a clean stack: it holds its spec and fds, nothing else of the server's."""
    libc.set_name("sbx-runner")
    worker = steps.Setup(spec, state, fds)
    try:
        timings = run_steps(steps.WORKER_STEPS, worker)
    except SetupError as e:
        fail(worker.link, worker.handoff, e)
    assert worker.handoff is not None
    handoff = worker.handoff
    args = RunnerArgs(state.filters[spec.filter_key], state.base_env, state.run_path, worker.scratch_fd,
                      spec.exec_argv, state.worker_preload, state.worker_warmup)
    setup = Setup(args)
    try:
        own = run_steps(EXEC_RUNNER_STEPS if args.exec_argv else RUNNER_STEPS, setup)
        armed = LINK_ARMED + msgpack.packb({**timings, **{f"runner.{k}": v for k, v in own.items()}})
        assert setup.sock is not None
        arm(setup.sock, armed, setup.listener)
    except SetupError as e:
        fail(setup.link, handoff, e)
    if args.exec_argv:
        exec_runtime(args, handoff)
    # Configured modules that the fork server may not import run here, confined (``preload``).
    report = preload.in_worker(args.preload, args.warmup, args.run_path)
    try:
        os.write(R_FD_LINK, LINK_READY + (msgpack.packb(report) if report else b""))
    except OSError as e:
        fail(R_FD_LINK, handoff, SetupError.from_os_error("ready", e))
    runtime.serve_one(handoff)


def arm(sock: socket.socket, message: bytes, listener: int) -> None:
    """Hand the daemon the listener, a pidfd of R and the scratch's top; none stays here."""
    try:
        socket.send_fds(sock, [message], [listener, R_FD_PIDFD, R_FD_SCRATCH])
    except OSError as e:
        raise SetupError.from_os_error("arm", e) from e
    finally:
        sock.detach()  # kept: runtime says LINK_STARTED on it, then closes it (a session keeps it)
        for fd in (listener, R_FD_PIDFD, R_FD_SCRATCH):
            os.close(fd)


def fail(link: int, handoff: Handoff | None, error: SetupError) -> NoReturn:
    if handoff is not None:
        handoff.setup_failed(error)
    try:
        os.write(link, LINK_SETUP_ERROR + msgpack.packb(error.to_dict()))
    except OSError:
        pass
    os._exit(EXIT_SETUP)


def exec_runtime(args: RunnerArgs, handoff: Handoff) -> NoReturn:
    """Become the runtime, confined: its bootstrap waits for the request on R_FD_REQUEST and
    says LINK_WAITING, then LINK_STARTED, on R_FD_LINK (both stay open across exec).  Until it
    says LINK_STARTED, the handoff page claims a setup failure of the step "runtime", believed
    only then."""
    handoff.setup_failed(SetupError("runtime", 0, f"{args.exec_argv[0]} did not get to the run's code"))
    try:
        os.execve(args.exec_argv[0], list(args.exec_argv), dict(args.base_env))
    except OSError as e:
        fail(R_FD_LINK, handoff, SetupError.from_os_error("exec", e))
    os._exit(EXIT_SETUP)
