"""R after confinement: wait for one request, prepare it, run the user's code, exit.

By the time ``serve_one`` runs, every confinement step is in place (seccomp
included), so nothing below -- not even parsing the request -- happens outside the
jail.  Releasing the run is a list of named steps too: the request's own rlimits
(lowering the pool's ceilings), its input files in the working directory, its
environment and ``sys.argv``, the word to P that setup is over, and closing every fd
but 0, 1 and 2.  Then the code runs as ``__main__``, with ``python3 -c`` semantics for
exit status, ``SystemExit``, uncaught exceptions, non-daemon threads and ``atexit``.
"""

from __future__ import annotations

import atexit
import builtins
import linecache
import os
import signal
import sys
import threading
import time
import traceback
import types
from typing import NoReturn

from .. import protocol
from . import limits
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
EXIT_FLUSH_FAILED = 120  # as CPython, when flushing stdout at exit fails
MAX_REQUEST = 1 << 30  # the daemon bounds what it sends; this only guards the decoder


def apply_limits(request: RunRequest) -> None:
    """The run's own rlimits, lowering the pool's ceilings."""
    limits.apply(request.rlimits)


def write_files(request: RunRequest) -> None:
    """The request's input files, into the working directory (names checked again here)."""
    for name, data in request.files.items():
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
            raise ValueError(f"bad file name {name!r}")
        if len(parts) > 1:
            os.makedirs(os.path.dirname(name), mode=0o755, exist_ok=True)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def set_environment(request: RunRequest) -> None:
    os.environ.update(request.env)
    sys.argv = list(request.argv)


def say_started(request: RunRequest) -> None:
    """The supervisor's proof that setup is over: a setup failure the handoff page claims
    after this (user code can write that page) is not believed."""
    os.write(R_FD_LINK, LINK_STARTED)


def close_fds(request: RunRequest) -> None:
    """Only fds 0-2 remain for user code."""
    os.closerange(3, 2**31 - 1)


RELEASE_STEPS: tuple[Step[RunRequest], ...] = (
    Step("limits", apply_limits),
    Step("files", write_files),
    Step("environment", set_environment),
    Step("started", say_started),
    Step("close_fds", close_fds),
)


def serve_one(handoff: Handoff, killed_when_done: bool) -> NoReturn:
    """Wait for the request, apply it, run the code. Everything here is already confined.

    ``killed_when_done``: after its code the runner tells the supervisor and waits to be
    killed, rather than exiting (the supervisor needs a real exit only for rusage).
    """
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
    _execute(request.code, handoff, killed_when_done)


def read_request() -> RunRequest:
    frame = protocol.read_frame(lambda n: os.read(R_FD_REQUEST, n), protocol.FrameDecoder(MAX_REQUEST))
    if not isinstance(frame, dict):
        raise ValueError("the request is not a map")
    return RunRequest.from_wire(frame)


def _execute(code: str, handoff: Handoff, killed_when_done: bool) -> NoReturn:
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
    status = 0
    handoff.write(Handoff.RUNNING, started_ns=time.monotonic_ns())
    try:
        exec(compile(code, FILENAME, "exec"), main.__dict__)
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException as e:  # noqa: BLE001 - report like the interpreter does
        handoff.set_exception(type(e).__name__)
        _report(e)
        status = 1
    status = _finish(status)
    # Tell the supervisor at once and get out of its way: it kills the run and reports,
    # and only then does the kernel tear this address space down (that teardown takes
    # longer than everything else after the user's last statement).
    handoff.finish(status)
    os.closerange(0, 3)
    try:
        os.kill(1, signal.SIGUSR1)
        while killed_when_done:
            signal.pause()
    except OSError:
        pass
    os._exit(status)


def _exit_status(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _report(e: BaseException) -> None:
    tb = e.__traceback__
    if tb is not None and tb.tb_frame.f_code is _execute.__code__:
        e = e.with_traceback(tb.tb_next)  # start at the user's code, as the interpreter does
    try:
        if sys.excepthook is sys.__excepthook__:
            traceback.print_exception(e)  # uses linecache, so the user's source lines are shown
        else:
            sys.excepthook(type(e), e, e.__traceback__)
    except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
        try:
            os.write(2, f"{type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        except BaseException:  # noqa: BLE001
            pass


def _finish(status: int) -> int:
    """Interpreter shutdown without finalisation: threads, atexit, flush."""
    for step in (threading._shutdown, atexit._run_exitfuncs):  # type: ignore[attr-defined]
        try:
            step()
        except SystemExit as e:
            status = _exit_status(e)
        except BaseException as e:  # noqa: BLE001
            _report(e)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            if stream is sys.stdout:
                status = status or EXIT_FLUSH_FAILED
    return status
