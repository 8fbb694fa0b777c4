"""R after confinement: wait for one request, prepare it, run the user's code, exit.

By the time ``serve_one`` runs, every confinement step is in place (seccomp
included), so nothing below -- not even parsing the request -- happens outside the
jail.  Releasing the run is a list of named steps too: the request's own rlimits
(lowering the pool's ceilings), its input files in the working directory, its
environment and ``sys.argv``, the word to P that setup is over, and closing every fd
but 0, 1 and 2 (a session keeps its request pipe and its link: ``cells``).  Then the
code runs as ``__main__``, with ``python3 -c`` semantics for exit status,
``SystemExit``, uncaught exceptions, non-daemon threads and ``atexit``; or, for a
session, the worker serves cells until the daemon ends it.
"""

from __future__ import annotations

import linecache
import os
import sys
import time
from typing import NoReturn

from ...common import protocol
from ..policy import limits
from . import cells, display, usercode
from .contract import (
    EXIT_SETUP,
    LINK_STARTED,
    R_FD_LINK,
    R_FD_REQUEST,
    Handoff,
    RunRequest,
    SetupError,
    Step,
    run_steps,
)

FILENAME = "<code>"
MAX_REQUEST = 1 << 30  # the daemon bounds what it sends; this only guards the decoder


def apply_limits(request: RunRequest) -> None:
    """The run's own rlimits, lowering the pool's ceilings."""
    limits.apply(request.rlimits)


def write_files(request: RunRequest) -> None:
    """The request's input files, into the working directory (names checked again here)."""
    usercode.write_files(request.files, replace=False)


def set_environment(request: RunRequest) -> None:
    os.environ.update(request.env)
    sys.argv = list(request.argv)
    if request.display:
        display.install()
    if request.stream or request.session:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # output as it is printed


def say_started(request: RunRequest) -> None:
    """The daemon's proof that setup is over: a setup failure the handoff page claims
    after this (user code can write that page) is not believed."""
    os.write(R_FD_LINK, LINK_STARTED)


def close_fds(request: RunRequest) -> None:
    """Only fds 0-2 remain for user code (a session's cells come on the request pipe, and
    are reported on the link: those two stay, not inherited by programs it starts)."""
    if not request.session:
        os.closerange(3, 2**31 - 1)
        return
    os.closerange(R_FD_LINK + 1, 2**31 - 1)
    for fd in (R_FD_REQUEST, R_FD_LINK):
        os.set_inheritable(fd, False)


RELEASE_STEPS: tuple[Step[RunRequest], ...] = (
    Step("limits", apply_limits),
    Step("files", write_files),
    Step("environment", set_environment),
    Step("started", say_started),
    Step("close_fds", close_fds),
)


def serve_one(handoff: Handoff) -> NoReturn:
    """Wait for the request, apply it, run the code. Everything here is already confined."""
    handoff.write(Handoff.WAITING)
    try:
        request = read_request()
    except EOFError:
        os._exit(0)  # the daemon retired this worker unused
    except Exception as e:  # noqa: BLE001
        handoff.setup_failed(SetupError.from_os_error("request", e))
        os._exit(EXIT_SETUP)
    try:
        run_steps(RELEASE_STEPS, request)
    except SetupError as e:
        handoff.setup_failed(e)
        os._exit(EXIT_SETUP)
    if request.session:
        cells.serve(handoff)
    _execute(request.code, handoff, request.display)


def read_request() -> RunRequest:
    frame = protocol.read_frame(lambda n: os.read(R_FD_REQUEST, n), protocol.FrameDecoder(MAX_REQUEST))
    if not isinstance(frame, dict):
        raise ValueError("the request is not a map")
    return RunRequest.from_wire(frame)


def _execute(code: str, handoff: Handoff, figures: bool) -> NoReturn:
    main = usercode.new_main().__dict__
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
    status = 0
    cpu0 = usercode.cpu_ns()
    handoff.write(Handoff.RUNNING, started_ns=time.monotonic_ns())
    try:
        exec(compile(code, FILENAME, "exec"), main)
    except SystemExit as e:
        status = usercode.exit_status(e)
    except BaseException as e:  # noqa: BLE001 - report like the interpreter does
        handoff.set_exception(type(e).__name__)
        usercode.print_exception(usercode.from_user_frame(e, main))
        status = 1
    if figures:
        display.save_open_figures()
    status = usercode.shutdown(status, main)
    # Tell the daemon at once and get out of its way: the page says done (and the status),
    # then the run's streams close, and the daemon answers as soon as it has read both to
    # their end -- without waiting for this address space to be torn down, which takes
    # longer than everything else after the user's last statement.
    handoff.finish(status, usercode.cpu_ns() - cpu0)
    os.closerange(0, 3)
    os._exit(status)
