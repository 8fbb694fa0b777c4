"""R after confinement: wait for one request, prepare it, run the user's code, exit.

By the time ``serve_one`` runs, every confinement step is in place (seccomp
included), so nothing below -- not even parsing the request -- happens outside the
jail.  The request's own rlimits are applied (lowering the pool's ceilings), input
files are written into the working directory, the environment, ``sys.argv``,
``sys.path`` and stdio are made fresh, modules that belong to the daemon rather than
the root are forgotten, the request pipe is closed -- leaving only fds 0, 1 and 2 --
and the code runs as ``__main__``, with ``python3 -c`` semantics for exit status,
``SystemExit``, uncaught exceptions, non-daemon threads and ``atexit``.
"""

from __future__ import annotations

import atexit
import builtins
import io
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
from .child import EXIT_SETUP, R_FD_CTRL, R_FD_LISTENER_SOCK, ServerState, StepFailure, run_steps
from .spec import Handoff, RunRequest

FILENAME = "<code>"
EXIT_FLUSH_FAILED = 120  # as CPython, when flushing stdout at exit fails


def serve_one(handoff: Handoff, killed_when_done: bool) -> NoReturn:
    """Wait for the request, apply it, run the code. Everything here is already confined.

    ``killed_when_done``: after its code the runner tells the supervisor and waits to be
    killed, rather than exiting (the supervisor needs a real exit only for rusage).
    """
    handoff.write(Handoff.WAITING)
    try:
        request = _read_request(R_FD_CTRL)
    except EOFError:
        os._exit(0)  # the daemon retired this worker unused
    except Exception as e:  # noqa: BLE001
        handoff.write(Handoff.SETUP, "request", 0, message=f"{type(e).__name__}: {e}")
        os._exit(EXIT_SETUP)
    try:
        run_steps([
            ("limits", lambda: limits.apply(request.rlimits)),
            ("files", lambda: _write_files(request.files)),
            ("environment", lambda: _environment(request)),
            # The supervisor's proof that setup is over: a setup failure the handoff page
            # claims after this (user code can write that page) is not believed.
            ("started", lambda: os.write(R_FD_LISTENER_SOCK, b"S")),
            ("close_fds", lambda: os.closerange(3, 2**31 - 1)),
        ])
    except StepFailure as f:
        handoff.write(Handoff.SETUP, f.step, f.errno, message=f.message)
        os._exit(EXIT_SETUP)
    _execute(request.code, handoff, killed_when_done)


def _read_request(fd: int) -> RunRequest:
    header = _read_exact(fd, protocol.HEADER.size)
    (n,) = protocol.HEADER.unpack(header)
    body = _read_exact(fd, n)
    return RunRequest.from_wire(protocol.decode_body(body, max_frame=n))


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_files(files: dict[str, bytes] | object) -> None:
    assert isinstance(files, dict)
    for name, data in files.items():
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


def prepare(state: ServerState) -> None:
    """A fresh interpreter state for user code, made before the worker waits in the pool."""
    os.environ.clear()
    os.environ.update(state.base_env)
    sys.argv = ["-c"]
    sys.path[:] = ["", *state.run_path]
    keep = set(state.run_path)
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
    request = RunRequest.from_wire(protocol.decode_body(sample[protocol.HEADER.size:]))
    code = compile(request.code, FILENAME, "exec")
    scratch = io.StringIO()
    exec(code, {"__builtins__": builtins, "print": lambda *a, **k: print(*a, **k, file=scratch)})
    types.ModuleType("__main__")


def _environment(request: RunRequest) -> None:
    os.environ.update(request.env)
    sys.argv = list(request.argv)


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
