"""R, the runner: its setup steps, seccomp last, then the wait for its one request.

P forks R after its own steps (so R already has every namespace, the root, the scratch,
the run's uid and rlimits).  R's steps, in order:

    stdio -> fds -> session -> no_new_privs -> prepare -> seccomp

``prepare`` is trusted interpreter housekeeping (a fresh environment, sys.path, stdio
objects, a warm-up of the release path) done while no user input exists.  The filter
is loaded last; its listener goes to P on the link with R's step timings.  Any step
that raises writes the failure into the handoff page and ends R with ``EXIT_SETUP``;
P reports it.  Then R is fully confined and waits for its request (``runtime``).
"""

from __future__ import annotations

import builtins
import io
import os
import socket
import sys
import types
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from ...common import protocol
from ..kernel import libc
from . import runtime
from .contract import (
    EXIT_SETUP,
    FD_REQUEST,
    FD_STDERR,
    FD_STDIN,
    FD_STDOUT,
    R_FD_LINK,
    R_FD_REQUEST,
    Handoff,
    RunnerArgs,
    RunRequest,
    SetupError,
    Step,
    remap_fds,
    run_steps,
)


@dataclass
class Setup:
    args: RunnerArgs
    link: int  # R's end of the link to P (placed at R_FD_LINK by the fds step)
    listener: int = -1  # the seccomp listener, once the filter is loaded


def stdio(s: Setup) -> None:
    os.dup2(FD_STDIN, 0)
    os.dup2(FD_STDOUT, 1)
    os.dup2(FD_STDERR, 2)


def place_fds(s: Setup) -> None:
    """Only the request pipe and the link remain above stdio."""
    remap_fds([FD_REQUEST, s.link], R_FD_REQUEST)


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


def runner_main(args: RunnerArgs, handoff: Handoff, link: int) -> NoReturn:
    """Entry point of R, from a clean stack: it holds ``args`` and nothing of P's or the server's."""
    libc.set_name("sbx-runner")
    setup = Setup(args, link)
    try:
        timings = run_steps(EXEC_RUNNER_STEPS if args.exec_argv else RUNNER_STEPS, setup)
        # Hand the listener to the supervisor; it answers refused calls from here on.
        sock = socket.socket(fileno=R_FD_LINK)
        try:
            socket.send_fds(sock, [msgpack.packb(timings)], [setup.listener])
        except OSError as e:
            raise SetupError.from_os_error("listener", e) from e
        finally:
            sock.detach()  # kept: runtime says LINK_STARTED on it, then closes it
        os.close(setup.listener)
    except SetupError as e:
        handoff.setup_failed(e)
        os._exit(EXIT_SETUP)
    if args.exec_argv:
        exec_runtime(args, handoff)
    runtime.serve_one(handoff, killed_when_done=args.killed_when_done)


def exec_runtime(args: RunnerArgs, handoff: Handoff) -> NoReturn:
    """Become the runtime, confined: its bootstrap waits for the request on R_FD_REQUEST and
    says LINK_STARTED on R_FD_LINK (both stay open across exec).  Until it says so, the
    handoff page claims a setup failure of the step "runtime", believed only then."""
    handoff.setup_failed(SetupError("runtime", 0, f"{args.exec_argv[0]} did not get to the run's code"))
    try:
        os.execve(args.exec_argv[0], list(args.exec_argv), dict(args.base_env))
    except OSError as e:
        handoff.setup_failed(SetupError.from_os_error("exec", e))
    os._exit(EXIT_SETUP)
